"""HTTP scoring service for the production line: the photos of a device in, its decision out, with latency figures.

    python -m dinov2.eval.serve --model runs/a/export/model.onnx --port 8080            # ONNX Runtime
    python -m dinov2.eval.serve --config-file C --pretrained-weights W --classifier F   # torch (Predictor)

    POST /score   {"images": [{"path": "/line/7/7-0.jpeg"}, {"data": "<base64 JPEG>", "name": "7-1"}, ...],
                   "group_ids": ["7", "7", ...]}              (group_ids optional: default all one device)
               -> Predictor.score's {"images": [...], "groups": [...]} + "latency_ms"
                  with "explain": true (torch model only), each image also gets its "evidence" and "attention"
                  maps on the patch grid and its "evidence_peak" (dinov2/eval/saliency.py); with
                  --anomaly-reference also its "anomaly" map and "anomaly_peak" (dinov2/eval/explain.py)
    GET  /health  -> {"status": "ok", "model": probe, classes, thresholds, backbone SHA-256, eval transform, anomaly
                     reference}
    GET  /stats   -> requests, images and errors served; latency mean and percentiles over the last requests; the
                     share of unfamiliar images among the last images (dinov2/eval/ood.py): the line's drift

Images come as files the service can read (`path`) or in the request (`data`, base64 of the encoded file). A bad
request (invalid JSON, a missing field, bad base64, an image that cannot be read: named) is answered 400 with
{"error": ...} and counted, the service goes on. Requests are scored one at a time (one model); the HTTP threads only
parse and answer. It listens on 127.0.0.1 unless `--host` says otherwise: `path` images are read with the service's
permissions.
"""

import argparse
import base64
import binascii
import collections
import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple

import numpy as np

from dinov2.data.datasets import ImageDecodeError
from dinov2.eval.explain import add_anomaly_arguments, build_patch_bank, device_maps
from dinov2.eval.ood import ood_summary
from dinov2.eval.predictor import OnnxPredictor, Predictor, PhotoScorer
from dinov2.eval.saliency import PatchBank, map_peak
from dinov2.eval.setup import get_args_parser as get_setup_args_parser
from dinov2.logging import setup_logging

logger = logging.getLogger("dinov2")

LATENCY_WINDOW = 1000  # requests the latency percentiles are taken over
UNFAMILIAR_WINDOW = 1000  # images the unfamiliar share is taken over


class BadRequest(ValueError):
    """A request the service cannot score: answered 400 with the message."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="HTTP scoring service for a saved probe",
                                     parents=[get_setup_args_parser(parents=None, add_help=False)])
    parser.add_argument("--model", type=str, default="", help="model.onnx written by dinov2.eval.export (ONNX Runtime)")
    parser.add_argument("--classifier", type=str, default="",
                        help="Without --model: a probe's saved classifier, scored with --config-file and "
                        "--pretrained-weights in torch")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="Address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="Port to listen on (0: any free port)")
    parser.add_argument("--decode-threads", type=int, default=4, help="Threads decoding the photos of a request")
    parser.add_argument("--max-request-mb", type=float, default=64.0, help="Largest request body accepted")
    add_anomaly_arguments(parser)
    return parser


def model_summary(predictor: PhotoScorer) -> Dict[str, object]:
    """What /health says about the model: probe, classes, thresholds, backbone and eval transform."""
    if isinstance(predictor, OnnxPredictor):
        meta = predictor.metadata
        keys = ("probe", "class_names", "thresholds", "ood", "backbone_sha256", "eval_transform")
        return {"runtime": "onnxruntime", **{key: meta[key] for key in keys}}
    saved = predictor.saved
    return {"runtime": "torch", "probe": saved.probe, "class_names": saved.class_names,
            "thresholds": saved.thresholds, "ood": ood_summary(saved.ood_params),
            "backbone_sha256": saved.source["backbone_sha256"], "eval_transform": saved.source["eval_transform"]}


def parse_score_request(body: bytes) -> Tuple[List[Optional[str]], List[Optional[bytes]], List[str],
                                              Optional[List[str]], bool]:
    """Body of POST /score -> (paths, encoded images, names, group ids, explain): per image either a path or its
    bytes."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not JSON: {e}") from None
    images = request.get("images") if isinstance(request, dict) else None
    if not isinstance(images, list) or not images:
        raise BadRequest('expected {"images": [{"path": ...} or {"data": <base64>, "name": ...}, ...], '
                         '"group_ids": [...] (optional)}')
    paths, data, names = [], [], []
    for i, image in enumerate(images):
        if not isinstance(image, dict) or ("path" in image) == ("data" in image):
            raise BadRequest(f"images[{i}] must have either a 'path' or a 'data' field")
        if "path" in image:
            paths.append(str(image["path"]))
            data.append(None)
            names.append(str(image["path"]))
            continue
        try:
            data.append(base64.b64decode(image["data"], validate=True))
        except (binascii.Error, TypeError, ValueError) as e:
            raise BadRequest(f"images[{i}].data is not base64: {e}") from None
        paths.append(None)
        names.append(str(image.get("name", f"image {i}")))
    group_ids = request.get("group_ids")
    if group_ids is not None and (not isinstance(group_ids, list) or len(group_ids) != len(images)):
        raise BadRequest(f"group_ids must be a list of {len(images)} ids, one per image")
    explain = request.get("explain", False)
    if not isinstance(explain, bool):
        raise BadRequest(f"explain must be true or false, got {explain!r}")
    return paths, data, names, group_ids, explain


class ScoringService:
    """A predictor behind a lock, with request counters and a window of latencies."""

    def __init__(self, predictor: PhotoScorer, max_request_bytes: int,
                 anomaly: Optional[Tuple[PatchBank, Dict[str, object]]] = None) -> None:
        self.predictor = predictor
        self.max_request_bytes = max_request_bytes
        self.bank = None if anomaly is None else anomaly[0]
        self.model = {**model_summary(predictor), "anomaly_reference": None if anomaly is None else anomaly[1]}
        self._lock = threading.Lock()
        self._latencies_ms: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)
        self._unfamiliar: collections.deque = collections.deque(maxlen=UNFAMILIAR_WINDOW)
        self.counts = {"requests": 0, "images": 0, "errors": 0}

    def score(self, body: bytes) -> Dict[str, object]:
        """Scores of a POST /score body; raises BadRequest for what the client must fix. The latency counts from the
        parsed request to its result, the wait for earlier requests included."""
        paths, data, names, group_ids, explain = parse_score_request(body)
        if explain and not isinstance(self.predictor, Predictor):
            raise BadRequest("explanations need the torch model (--config-file, --pretrained-weights, --classifier): "
                             "an ONNX model has no gradients")
        start = time.perf_counter()
        with self._lock:
            try:
                result = self._score(paths, data, names, group_ids, explain)
            except (ImageDecodeError, ValueError) as e:
                raise BadRequest(str(e)) from None
            latency_ms = 1000 * (time.perf_counter() - start)
            self._latencies_ms.append(latency_ms)
            self.counts["requests"] += 1
            self.counts["images"] += len(names)
            self._unfamiliar.extend(image["unfamiliar"] for image in result["images"]
                                    if image["unfamiliar"] is not None)
        return {**result, "latency_ms": round(latency_ms, 3)}

    def _score(self, paths: List[Optional[str]], data: List[Optional[bytes]], names: List[str],
               group_ids: Optional[List[str]], explain: bool) -> Dict[str, List[Dict]]:
        """The predictor's result for images given by path or bytes (read here when both kinds come); explained:
        with each image's evidence and attention maps (rows of floats)."""
        by_path = all(d is None for d in data)
        encoded = None if by_path else [d if d is not None else _read(path) for d, path in zip(data, paths)]
        if not explain:
            if by_path:
                return self.predictor.score(paths, group_ids)
            return self.predictor.score_encoded(encoded, names, group_ids)
        if by_path:
            result, explanation, _ = self.predictor.explain(paths, group_ids)
        else:
            result, explanation, _ = self.predictor.explain_encoded(encoded, names, group_ids)
        maps = device_maps(explanation, self.bank)
        for i, image in enumerate(result["images"]):
            image["evidence"], image["attention"] = maps["evidence"][i].tolist(), maps["attention"][i].tolist()
            if self.bank is not None:
                image["anomaly"] = maps["anomaly"][i].tolist()
                image["anomaly_peak"] = map_peak(maps["anomaly"][i], self.predictor.patch_size)
        return result

    def count_error(self) -> None:
        with self._lock:
            self.counts["errors"] += 1

    def stats(self) -> Dict[str, object]:
        with self._lock:
            latencies = np.array(self._latencies_ms)
            unfamiliar = np.array(self._unfamiliar, dtype=bool)
            counts = dict(self.counts)
        figures = {}
        if len(latencies):
            figures = {"mean": float(latencies.mean()), "max": float(latencies.max()),
                       **{f"p{q}": float(np.percentile(latencies, q)) for q in (50, 90, 99)}}
        ood = self.model["ood"]
        return {**counts, "latency_ms": {k: round(v, 3) for k, v in figures.items()},
                "latency_window": len(latencies),
                "unfamiliar_share": float(unfamiliar.mean()) if len(unfamiliar) else None,
                "unfamiliar_share_expected": None if ood is None else 1.0 - ood["quantile"],
                "unfamiliar_window": len(unfamiliar)}


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadRequest(f"can not read image {path}: {e}") from None


class _Handler(BaseHTTPRequestHandler):
    service: ScoringService  # set on the subclass made by make_server

    def _reply(self, status: HTTPStatus, payload: Dict[str, object]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self.service.count_error()
        self._reply(status, {"error": message})

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path == "/health":
            self._reply(HTTPStatus.OK, {"status": "ok", "model": self.service.model})
        elif self.path == "/stats":
            self._reply(HTTPStatus.OK, self.service.stats())
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {self.path} (GET /health, GET /stats)")

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/score":
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path} (POST /score)")
            return
        header = self.headers.get("Content-Length") or "0"
        if not header.strip().isdecimal():  # not a count of bytes (negative, or not a number): the body is not read
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, f"Content-Length must be a number of bytes, got {header!r}")
            return
        length = int(header)
        if length > self.service.max_request_bytes:
            self.close_connection = True  # the body is not read
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"request of {length} bytes exceeds --max-request-mb ({self.service.max_request_bytes} bytes)")
            return
        try:
            self._reply(HTTPStatus.OK, self.service.score(self.rfile.read(length)))
        except BadRequest as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
        except Exception as e:  # answered, logged and counted: one bad request does not stop the line
            logger.exception("scoring failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")

    def log_message(self, format: str, *args) -> None:
        logger.info("%s %s", self.address_string(), format % args)


def make_server(service: ScoringService, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) answering with `service`; port 0 picks a free port (server.server_port)."""
    handler = type("Handler", (_Handler,), {"service": service})
    return ThreadingHTTPServer((host, port), handler)


def build_predictor(args: argparse.Namespace) -> PhotoScorer:
    if bool(args.model) == bool(args.classifier):
        raise ValueError("give either --model (an exported model.onnx) or --classifier with --config-file and "
                         "--pretrained-weights")
    if args.model:
        return OnnxPredictor(args.model, decode_threads=args.decode_threads)
    return Predictor(args.config_file, args.pretrained_weights, args.classifier, opts=args.opts,
                     decode_threads=args.decode_threads)


def build_service(args: argparse.Namespace) -> ScoringService:
    """The predictor of the options, with the patch bank of --anomaly-reference (torch model only)."""
    predictor = build_predictor(args)
    anomaly = None
    if args.anomaly_reference:
        if not isinstance(predictor, Predictor):
            raise ValueError("--anomaly-reference needs the torch model (--config-file, --pretrained-weights, "
                             "--classifier), not --model")
        anomaly = build_patch_bank(predictor, args.anomaly_reference, args.anomaly_bank_size, args.seed)
    return ScoringService(predictor, int(args.max_request_mb * 2**20), anomaly)


def main(args: argparse.Namespace) -> int:
    setup_logging(output=args.output_dir or None, level=logging.INFO)
    service = build_service(args)
    server = make_server(service, args.host, args.port)
    logger.info(f"scoring service on http://{args.host}:{server.server_port} ({service.model['runtime']}, "
                f"{service.model['probe']} classifier): POST /score, GET /health, GET /stats")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info(f"stopped: {service.stats()}")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
