"""dinov2.eval.features: one extraction per split shared by the probes, cache keys, random baseline, torchrun."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_helpers import QC_ARGS, dataset_str, load_eval_config, probe_args, probe_options, read_results

import dinov2.distributed as distributed
from dinov2.data import make_dataset
from dinov2.data.transforms import make_classification_eval_transform
from dinov2.eval import knn
from dinov2.eval.features import FeatureSet, FeatureStore, backbone_fingerprint, held_out_groups, split_tag
from dinov2.eval.setup import build_model_for_eval

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_split_tag():
    assert split_tag("BBU:root=/d:split=TEST") == "test"
    assert split_tag("BBU:root=/d:split=VAL:annotation_file=annotations/line-2.json") == "line_2"
    assert split_tag("ImageFolder:root=/x") == "imagefolder"


def test_each_split_is_extracted_once_for_all_probes(teacher_run, sample_root):
    output_dir, counts = teacher_run
    train, val, test = (dataset_str(sample_root, s) for s in ("TRAIN", "VAL", "TEST"))
    assert counts["knn"] == {train: 1, test: 1}
    assert counts["linear"] == {train: 1, val: 1, test: 1}  # k-NN's train and test features reused
    assert counts["log_regression"] == counts["linear"]  # nothing extracted again
    assert sorted(p.name.split("_")[0] for p in (output_dir / "features").glob("*.pt")) == ["test", "train", "val"]


def test_random_baseline_has_its_own_cache_and_results(teacher_run, random_run):
    teacher_dir, _ = teacher_run
    random_dir, counts = random_run
    assert sum(counts["log_regression"].values()) == 3
    teacher_files = {p.name for p in (teacher_dir / "features").glob("*.pt")}
    random_files = {p.name for p in (random_dir / "features").glob("*.pt")}
    assert len(random_files) == 3 and not teacher_files & random_files  # the weights are part of the key
    for probe in ("knn", "linear", "log_regression"):
        results = read_results(random_dir, probe)
        assert results["random_init"] is True and results["pretrained_weights"] == "random"
    (t_path,) = (teacher_dir / "features").glob("test_*.pt")
    (r_path,) = (random_dir / "features").glob("test_*.pt")
    t, r = torch.load(t_path, weights_only=True), torch.load(r_path, weights_only=True)
    assert torch.equal(t["labels"], r["labels"]) and not torch.allclose(t["features"], r["features"])


def test_cache_key_covers_transform_and_annotations(tmp_path, eval_config, sample_root):
    cfg = load_eval_config(eval_config)
    model = build_model_for_eval(cfg, "random")
    store = FeatureStore(model, torch.float32, cfg, "random", transform=None, cache_dir=str(tmp_path),
                         batch_size=4, num_workers=0)
    other = FeatureStore(model, torch.float32, cfg, "random", transform="other", cache_dir=str(tmp_path),
                         batch_size=4, num_workers=0)
    test = dataset_str(sample_root, "TEST")
    dataset = make_dataset(dataset_str=test)
    fields = store.cache_fields(test, dataset)
    assert store.cache_path(test, fields) != other.cache_path(test, other.cache_fields(test, dataset))
    mixed = make_dataset(dataset_str=dataset_str(sample_root, "TEST", "mixed.json"))  # same images, one label changed
    assert store.cache_fields(test, mixed)["content"] != fields["content"]
    path = store.cache_path(test, fields)
    torch.save({"fields": {"dataset": "something else"}, "features": torch.zeros(6, 5), "labels": torch.zeros(6)},
               path)
    with pytest.raises(ValueError, match="does not match"):
        store._load(path, fields, 6)


def test_cache_key_is_the_weights_fingerprint_when_known(tmp_path, eval_config, sample_root):
    """Features are keyed on the backbone's state-dict SHA-256 (from `feature_source`), not on where its file is."""
    cfg = load_eval_config(eval_config)
    model = build_model_for_eval(cfg, "random")
    test = dataset_str(sample_root, "TEST")
    dataset = make_dataset(dataset_str=test)

    def path(weights: str, sha256: str) -> str:
        store = FeatureStore(model, torch.float32, cfg, weights, transform=None, cache_dir=str(tmp_path),
                             batch_size=4, num_workers=0, source={"backbone_sha256": sha256})  # fmt: skip
        assert store.base_fields["weights"] == {"backbone_sha256": sha256}
        return store.cache_path(test, store.cache_fields(test, dataset))

    assert path("a/teacher.pth", "1" * 64) == path("b/copy.pth", "1" * 64)
    assert path("a/teacher.pth", "1" * 64) != path("a/teacher.pth", "2" * 64)


def test_cast_weights_extract_in_their_dtype_into_their_own_cache(tmp_path, eval_config, sample_root):
    """A backbone cast to bf16 (`--cast-weights`) runs wholly in bf16, without autocast: features within bf16
    rounding of the float32 ones, cached under their own key."""
    cfg = load_eval_config(eval_config)
    transform = make_classification_eval_transform(resize_size=64, crop_size=64)
    test = dataset_str(sample_root, "TEST")
    features, fields, paths = [], [], []
    for cast in (False, True):
        model = build_model_for_eval(cfg, "random")
        if cast:
            model.to(torch.bfloat16)
        store = FeatureStore(model, torch.float32, cfg, "random", transform, cache_dir=str(tmp_path), batch_size=4,
                             num_workers=0)
        fields.append(store.cache_fields(test, make_dataset(dataset_str=test)))
        paths.append(store.cache_path(test, fields[-1]))
        feature_set = store.get(test)
        features.append(torch.cat([feature_set.cls.flatten(1), feature_set.patch_mean], dim=1))
    assert (fields[0]["dtype"], fields[1]["dtype"]) == ("torch.float32", "torch.bfloat16")
    assert "cast_weights" not in fields[0] and fields[1]["cast_weights"] is True
    assert paths[0] != paths[1] and all(os.path.isfile(p) for p in paths)
    plain, cast = features
    assert cast.dtype == torch.float32 and cast.shape == plain.shape and not torch.equal(cast, plain)
    assert F.cosine_similarity(cast, plain).min() > 0.999


@pytest.mark.parametrize("probe", ["knn", "linear", "log_regression"])
def test_probe_under_torchrun_matches_single_process(probe, tmp_path, teacher_run, sample_root, eval_config,
                                                     teacher_checkpoint):
    """Two gloo ranks: features extracted by shards and all-gathered equal the single-process ones; the probe runs
    once (rank 0) and writes the same predictions."""
    teacher_dir, _ = teacher_run
    output_dir = tmp_path / "torchrun"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        os.path.join(REPO_ROOT, "dinov2", "eval", f"{probe}.py"),
        "--config-file", str(eval_config), "--pretrained-weights", str(teacher_checkpoint),
        "--output-dir", str(output_dir), *QC_ARGS, *probe_options(probe, sample_root),
    ]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for cached in (teacher_dir / "features").glob("*.pt"):
        if cached.name.startswith("val") and probe == "knn":
            continue
        (dist_path,) = (output_dir / "features").glob(f"{cached.name.split('_')[0]}_*.pt")
        single, dist = torch.load(cached, weights_only=True), torch.load(dist_path, weights_only=True)
        assert torch.equal(single["labels"], dist["labels"])
        assert torch.allclose(single["features"], dist["features"], atol=1e-5)
    rows = {}
    for name, directory in (("single", teacher_dir), ("dist", output_dir)):
        with open(directory / f"predictions_{probe}_test.csv") as f:
            rows[name] = list(csv.DictReader(f))
    assert [(r["img_path"], r["label"]) for r in rows["single"]] == [(r["img_path"], r["label"]) for r in rows["dist"]]
    assert [float(r["score"]) for r in rows["dist"]] == pytest.approx([float(r["score"]) for r in rows["single"]],
                                                                       abs=1e-3)
    assert read_results(output_dir, probe)["settings"].keys() == read_results(teacher_dir, probe)["settings"].keys()


def test_probes_refuse_unlabelled_images_and_other_class_lists():
    labels = np.array([0, -1, 1])
    split = FeatureSet("BBU:root=/d:split=VAL", torch.zeros(3, 1, 2), torch.zeros(3, 2), labels, ["a", "b", "c"],
                       ["x", "y", "z"], ["negative", "positive"])
    with pytest.raises(ValueError, match=r"split=VAL: 1 of 3 images are unlabelled"):
        split.require_labels()
    other = FeatureSet("BBU:root=/d:split=TRAIN", torch.zeros(3, 1, 2), torch.zeros(3, 2), np.zeros(3), ["a"] * 3,
                       ["x"] * 3, ["ok", "scratch", "dent"])
    with pytest.raises(ValueError, match=r"split=VAL has classes \['negative', 'positive'\].*split=TRAIN"):
        split.require_classes_of(other)


def test_compiled_extraction_gives_the_same_features(tmp_path, teacher_run, sample_root, eval_config,
                                                     teacher_checkpoint):
    """`--compile aot_eager` (dynamo + AOTAutograd, no C++ compiler needed): the k-NN probe's cached features equal
    the uncompiled ones; an unknown backend is refused before any extraction."""
    teacher_dir, _ = teacher_run
    output_dir = tmp_path / "compiled"
    args = probe_args(knn, eval_config, teacher_checkpoint, output_dir, *probe_options("knn", sample_root),
                      "--compile", "aot_eager")
    try:
        knn.run_eval_knn(args)
    finally:
        distributed.disable()
    compared = 0
    for compiled_path in (output_dir / "features").glob("*.pt"):
        (plain_path,) = (teacher_dir / "features").glob(f"{compiled_path.name.split('_')[0]}_*.pt")
        compiled, plain = torch.load(compiled_path, weights_only=True), torch.load(plain_path, weights_only=True)
        assert torch.allclose(compiled["features"], plain["features"], atol=1e-5)
        compared += 1
    assert compared == 2  # train and test
    bad = probe_args(knn, eval_config, teacher_checkpoint, tmp_path / "bad", *probe_options("knn", sample_root),
                     "--compile", "turbo")
    with pytest.raises(ValueError, match="--compile 'turbo' is not a torch.compile backend"):
        knn.run_eval_knn(bad)
    assert not (tmp_path / "bad" / "features").exists()


def test_backbone_fingerprint_follows_the_weights_not_the_file(tmp_path, eval_config, teacher_checkpoint):
    """The same weights from another path and in the hub layout give the same fingerprint; any change does not."""
    cfg = load_eval_config(eval_config)
    model = build_model_for_eval(cfg, str(teacher_checkpoint))
    state = torch.load(teacher_checkpoint, weights_only=True)["teacher"]
    hub_file = tmp_path / "copied" / "backbone.pth"
    hub_file.parent.mkdir()
    torch.save({k[len("backbone."):]: v for k, v in state.items()}, hub_file)
    assert backbone_fingerprint(build_model_for_eval(cfg, str(hub_file))) == backbone_fingerprint(model)
    assert backbone_fingerprint(build_model_for_eval(cfg, "random")) != backbone_fingerprint(model)
    fingerprint = backbone_fingerprint(model)
    with torch.no_grad():
        model.blocks[-1].mlp.fc2.bias[0] += 1e-6
    assert backbone_fingerprint(model) != fingerprint
    assert backbone_fingerprint(model.to(torch.bfloat16)) != backbone_fingerprint(model.float())


def test_held_out_split_is_group_disjoint_and_stratified():
    groups = [str(i // 3) for i in range(60)]
    labels = np.array([int(i // 3 < 5) for i in range(60)])  # groups 0-4 positive, 5-19 negative
    labels[59] = 1  # a mixed group (19) counts as positive
    train = FeatureSet("t", None, None, labels, groups, [""] * 60, ["a", "b"])
    fit, held = held_out_groups(train, seed=0)
    assert sorted(np.concatenate([fit, held]).tolist()) == list(range(60))
    held_groups = {groups[i] for i in held}
    assert not held_groups & {groups[i] for i in fit}
    # 10% of 6 positive groups -> 1, 10% of 14 negative groups -> 1
    assert len(held_groups) == 2 and len(held_groups & {"0", "1", "2", "3", "4", "19"}) == 1
    assert np.array_equal(held, held_out_groups(train, seed=0)[1])
    single = FeatureSet("t", None, None, np.zeros(3, dtype=np.int64), ["g"] * 3, [""] * 3, ["a", "b"])
    assert held_out_groups(single, seed=0)[1].tolist() == []
