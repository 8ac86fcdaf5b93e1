"""dinov2.eval.serve: the HTTP scoring service answers as the predictor, names bad requests and goes on."""

import base64
import http.client
import json
import re
import threading
import urllib.error
import urllib.request

import pytest
from eval_helpers import dataset_str

from dinov2.eval import export, serve
from dinov2.eval.ood import ood_summary
from dinov2.eval.predictor import OnnxPredictor, Predictor


def call(base: str, path: str, payload=None, raw: bytes = None):
    """(status, JSON answer) of GET (no payload) or POST."""
    data = raw if raw is not None else (None if payload is None else json.dumps(payload).encode())
    request = urllib.request.Request(base + path, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def running(request):
    """Start a service for a predictor on a free port; yields its base URL and the service."""
    servers = []

    def start(predictor, max_request_bytes=1 << 20):
        """`predictor`: a predictor, or a whole `ScoringService`."""
        if isinstance(predictor, serve.ScoringService):
            service = predictor
        else:
            service = serve.ScoringService(predictor, max_request_bytes)
        server = serve.make_server(service, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}", service

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_service_answers_as_the_predictor(running, teacher_run, sample_root, eval_config, teacher_checkpoint):
    teacher_dir, _ = teacher_run
    classifier = str(teacher_dir / "linear_classifier.pth")
    predictor = Predictor(str(eval_config), str(teacher_checkpoint), classifier)
    base, _ = running(predictor)
    photos = sorted((sample_root / "test").glob("*/*.jpeg"))
    groups = [photo.parent.name for photo in photos]
    status, answer = call(base, "/score", {"images": [{"path": str(p)} for p in photos], "group_ids": groups})
    assert status == 200 and answer.pop("latency_ms") > 0
    assert answer == predictor.score(photos, groups)
    # the same photos sent in the request, with names: the same scores and decisions under those names
    images = [{"data": base64.b64encode(p.read_bytes()).decode(), "name": p.name} for p in photos]
    status, sent = call(base, "/score", {"images": images, "group_ids": groups})
    assert status == 200
    assert [r["path"] for r in sent["images"]] == [p.name for p in photos]
    assert [(r["score"], r["positive"]) for r in sent["images"]] == [(r["score"], r["positive"])
                                                                     for r in answer["images"]]
    assert sent["groups"] == answer["groups"]
    # mixed: a path and a sent image of one device, default group
    status, mixed = call(base, "/score", {"images": [{"path": str(photos[0])}, images[1]]})
    assert status == 200 and [g["group_id"] for g in mixed["groups"]] == ["device"]
    assert [r["score"] for r in mixed["images"]] == [r["score"] for r in answer["images"][:2]]
    # explained: the same answer, with each image's maps and evidence peak as Predictor.explain gives them
    status, explained = call(base, "/score", {"images": [{"path": str(p)} for p in photos[:3]],
                                              "group_ids": groups[:3], "explain": True})
    result, explanation, _ = predictor.explain(photos[:3], groups[:3])
    assert status == 200 and explained.pop("latency_ms") > 0
    for image, evidence, attention in zip(explained["images"], explanation.evidence, explanation.attention):
        assert image.pop("evidence") == evidence.tolist() and image.pop("attention") == attention.tolist()
    assert explained == json.loads(json.dumps(result))
    status, health = call(base, "/health")
    assert status == 200 and health["status"] == "ok"
    assert health["model"] == {"runtime": "torch", "probe": "linear", "class_names": predictor.saved.class_names,
                               "thresholds": predictor.saved.thresholds,
                               "ood": ood_summary(predictor.saved.ood_params),
                               "backbone_sha256": predictor.saved.source["backbone_sha256"],
                               "eval_transform": predictor.saved.source["eval_transform"],
                               "anomaly_reference": None}
    status, stats = call(base, "/stats")
    assert status == 200 and (stats["requests"], stats["images"], stats["errors"]) == (4, 2 * len(photos) + 5, 0)
    assert stats["latency_window"] == 4
    assert list(stats["latency_ms"]) == ["mean", "max", "p50", "p90", "p99"]
    assert stats["latency_ms"]["p50"] <= stats["latency_ms"]["p99"] <= stats["latency_ms"]["max"]
    served = answer["images"] + sent["images"] + mixed["images"] + explained["images"]
    assert stats["unfamiliar_window"] == len(served) == 2 * len(photos) + 5
    assert stats["unfamiliar_share"] == pytest.approx(sum(i["unfamiliar"] for i in served) / len(served))
    assert stats["unfamiliar_share_expected"] == pytest.approx(0.01)


def test_bad_requests_are_named_and_the_service_goes_on(tmp_path, running, teacher_run, sample_root, eval_config,
                                                        teacher_checkpoint):
    teacher_dir, _ = teacher_run
    predictor = Predictor(str(eval_config), str(teacher_checkpoint), str(teacher_dir / "knn_classifier.pth"))
    base, _ = running(predictor, max_request_bytes=4096)
    photo = str(next((sample_root / "test").glob("*/*.jpeg")))
    corrupt = tmp_path / "7-1.jpeg"
    corrupt.write_bytes(b"\xff\xd8 not a jpeg")
    cases = [
        ("/score", None, b"{not json", 400, "the body is not JSON"),
        ("/score", {"images": []}, None, 400, 'expected {"images"'),
        ("/score", {"images": [{"path": photo, "data": "AAAA"}]}, None, 400, "images\\[0\\] must have either"),
        ("/score", {"images": [{"data": "%%%"}]}, None, 400, "images\\[0\\].data is not base64"),
        ("/score", {"images": [{"path": photo}], "group_ids": ["a", "b"]}, None, 400, "group_ids must be a list of 1"),
        ("/score", {"images": [{"path": photo}, {"path": str(corrupt)}]}, None, 400, f"sample 1: {corrupt}"),
        ("/score", {"images": [{"data": base64.b64encode(b"junk").decode(), "name": "cam-2"}]}, None, 400,
         "sample 0: cam-2"),
        ("/score", {"images": [{"path": str(tmp_path / "missing.jpeg")}, {"data": "AAAA"}]}, None, 400,
         "can not read image .*missing.jpeg"),
        ("/score", {"images": [{"path": photo}], "explain": "yes"}, None, 400, "explain must be true or false"),
        ("/score", None, b"x" * 5000, 413, "request of 5000 bytes exceeds --max-request-mb"),
        ("/other", {"images": []}, None, 404, "no such endpoint: POST /other"),
        ("/other", None, None, 404, "no such endpoint: GET /other"),
    ]
    for path, payload, raw, status, message in cases:
        got_status, answer = call(base, path, payload, raw)
        assert got_status == status and re.search(message, answer["error"]), (path, payload, raw, answer)
    bad_lengths = ["-1", "12abc"]  # answered at once: a negative length would otherwise block the handler's read
    for length in bad_lengths:
        connection = http.client.HTTPConnection(base[len("http://"):], timeout=60)
        connection.putrequest("POST", "/score")
        connection.putheader("Content-Length", length)
        connection.endheaders(b"{}")
        response = connection.getresponse()
        answer = json.loads(response.read())
        connection.close()
        assert (response.status, answer["error"]) == (400, f"Content-Length must be a number of bytes, got '{length}'")
    status, answer = call(base, "/score", {"images": [{"path": photo}]})
    assert status == 200 and len(answer["images"]) == 1
    status, stats = call(base, "/stats")
    assert (stats["requests"], stats["images"], stats["errors"]) == (1, 1, len(cases) + len(bad_lengths))


def test_onnx_model_served_from_the_command_line_options(tmp_path, running, teacher_run, sample_root, eval_config,
                                                         teacher_checkpoint):
    """`--model model.onnx` serves the export in ONNX Runtime; --model and --classifier exclude each other."""
    teacher_dir, _ = teacher_run
    classifier = str(teacher_dir / "log_regression_classifier.json")
    export.run_export(export.get_args_parser().parse_args([
        "--config-file", str(eval_config), "--pretrained-weights", str(teacher_checkpoint), "--classifier", classifier,
        "--output-dir", str(tmp_path), "--check-datasets", dataset_str(sample_root, "TEST")]))
    predictor = serve.build_predictor(serve.get_args_parser().parse_args(["--model", str(tmp_path / "model.onnx")]))
    assert isinstance(predictor, OnnxPredictor)
    base, _ = running(predictor)
    photos = sorted((sample_root / "test").glob("*/*.jpeg"))
    status, answer = call(base, "/score", {"images": [{"path": str(p)} for p in photos]})
    assert status == 200
    torch_scores = Predictor(str(eval_config), str(teacher_checkpoint), classifier).score(photos)
    assert [r["score"] for r in answer["images"]] == pytest.approx([r["score"] for r in torch_scores["images"]],
                                                                   abs=1e-5)
    status, health = call(base, "/health")
    assert health["model"]["runtime"] == "onnxruntime" and health["model"]["probe"] == "log_regression"
    status, answer = call(base, "/score", {"images": [{"path": str(photos[0])}], "explain": True})
    assert status == 400 and answer["error"].startswith("explanations need the torch model")
    for argv in ([], ["--model", "m.onnx", "--classifier", classifier]):
        with pytest.raises(ValueError, match="give either --model"):
            serve.build_predictor(serve.get_args_parser().parse_args(argv))
    with pytest.raises(ValueError, match="--anomaly-reference needs the torch model"):
        serve.build_service(serve.get_args_parser().parse_args(
            ["--model", str(tmp_path / "model.onnx"), "--anomaly-reference", dataset_str(sample_root, "TRAIN")]))


def test_explanations_carry_the_anomaly_map_of_the_reference(running, teacher_run, sample_root, eval_config,
                                                            teacher_checkpoint):
    teacher_dir, _ = teacher_run
    train = dataset_str(sample_root, "TRAIN")
    service = serve.build_service(serve.get_args_parser().parse_args([
        "--config-file", str(eval_config), "--pretrained-weights", str(teacher_checkpoint), "--classifier",
        str(teacher_dir / "linear_classifier.pth"), "--anomaly-reference", train, "--anomaly-bank-size", "40"]))
    assert service.model["anomaly_reference"] == {"dataset": train, "n_images": 9, "n_patches": 45, "seed": 0}
    base, _ = running(service)
    photos = sorted((sample_root / "test").glob("*/*.jpeg"))[:3]
    status, answer = call(base, "/score", {"images": [{"path": str(p)} for p in photos], "explain": True})
    _, explanation, _ = service.predictor.explain(photos)
    expected = service.bank.anomaly(explanation.patch_tokens).reshape(3, 4, 4)
    assert status == 200
    for image, grid in zip(answer["images"], expected):
        assert image["anomaly"] == grid.tolist()
        assert image["anomaly_peak"]["value"] == pytest.approx(float(grid.max()))
