"""dinov2.eval.ood: unfamiliarity is the PCA residual of held-out-fitted training features, flagged above a quantile of
the held-out images; the three probes save the same model."""

import json

import numpy as np
import pytest
import torch
from eval_helpers import CLASSIFIER_FILES, cached_feature_set, read_results

from dinov2.eval.features import FeatureSet, held_out_groups
from dinov2.eval.ood import OodHead, fit_ood, ood_summary
from dinov2.eval.saved_probe import load_probe_classifier


def subspace_features(n_groups: int = 20, views: int = 3, dim: int = 8, seed: int = 0) -> FeatureSet:
    """Class tokens (scaled) near a 3-dimensional subspace of R^dim; labels alternate by group."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, 3)))[0]
    n = n_groups * views
    x = rng.normal(size=(n, 3)) @ basis.T + 0.01 * rng.normal(size=(n, dim)) + 2 * basis[:, 0]
    cls = torch.from_numpy(5.0 * x).float()[:, None]  # one block; the head normalises
    labels = np.array([(i // views) % 2 for i in range(n)])
    groups = [str(i // views) for i in range(n)]
    return FeatureSet("synthetic", cls, torch.zeros(n, dim), labels, groups, [f"{i}.jpeg" for i in range(n)],
                      ["negative", "positive"])


def reference_residuals(train: FeatureSet, fit_idx: np.ndarray, rank: int, points: np.ndarray) -> np.ndarray:
    x = train.normalized_cls().double().numpy()
    mean = x[fit_idx].mean(axis=0)
    _, _, vh = np.linalg.svd(x[fit_idx] - mean, full_matrices=False)
    centred = points / np.linalg.norm(points, axis=1, keepdims=True) - mean
    return np.linalg.norm(centred - centred @ vh[:rank].T @ vh[:rank], axis=1)


def test_unfamiliarity_is_the_residual_and_the_threshold_a_held_out_quantile():
    train = subspace_features()
    params = json.loads(json.dumps(fit_ood(train, n_components=3, quantile=0.9)))  # JSON-able, as saved
    fit_idx, held_idx = held_out_groups(train, 0)
    assert (params["method"], params["n_components"], params["quantile"]) == ("pca_residual", 3, 0.9)
    assert len(params["mean"]) == 8 and np.array(params["components"]).shape == (3, 8)
    held = reference_residuals(train, fit_idx, 3, train.cls[held_idx, -1].double().numpy())
    assert params["threshold"] == pytest.approx(float(np.quantile(held, 0.9)), rel=1e-6)
    head = OodHead(params)
    rng = np.random.default_rng(1)
    familiar = train.cls[:5, -1].double().numpy() + 0.001 * rng.normal(size=(5, 8))
    off = familiar + 3.0 * np.linalg.svd(rng.normal(size=(8, 8)))[0][:, 7]  # a move out of the subspace...
    off -= (off - familiar) @ np.array(params["components"]).T @ np.array(params["components"])  # ...only out of it
    points = np.concatenate([familiar, off])
    unfamiliarity, unfamiliar = head(torch.from_numpy(points).float()[:, None])
    np.testing.assert_allclose(unfamiliarity.numpy(), reference_residuals(train, fit_idx, 3, points.astype(np.float32)),
                               rtol=1e-5, atol=1e-7)
    assert unfamiliar.tolist() == [False] * 5 + [True] * 5
    assert torch.equal(unfamiliar, unfamiliarity > params["threshold"])


def test_rank_is_capped_and_zero_components_is_the_distance_to_the_mean():
    train = subspace_features(n_groups=4, views=1)  # 4 images: 2 groups held out (one per label), 2 fitted
    params = fit_ood(train, n_components=32, quantile=1.0)
    assert params["n_components"] == 1  # fitted images - 1
    fit_idx, held_idx = held_out_groups(train, 0)
    held = reference_residuals(train, fit_idx, 1, train.cls[held_idx, -1].double().numpy())
    assert params["threshold"] == pytest.approx(float(held.max()), rel=1e-6)  # quantile 1: the largest
    zero = fit_ood(train, n_components=0, quantile=0.5)
    x = train.normalized_cls().double()
    expected = (x[held_idx] - x[fit_idx].mean(dim=0)).norm(dim=1)
    assert OodHead(zero).unfamiliarity(train.cls[held_idx]).tolist() == pytest.approx(expected.tolist(), rel=1e-6)


def test_no_model_without_a_group_to_hold_out(caplog):
    one_group = FeatureSet("one", torch.randn(3, 1, 4), torch.zeros(3, 4), np.zeros(3, dtype=np.int64), ["g"] * 3,
                           ["a", "b", "c"], ["negative", "positive"])
    assert fit_ood(one_group, 4, 0.99) is None
    assert "one: no training groups to hold out" in caplog.text
    assert ood_summary(None) is None
    with pytest.raises(ValueError, match="ood components must be >= 0 and the quantile in \\(0, 1\\], got 4, 0.0"):
        fit_ood(subspace_features(), 4, 0.0)


def test_the_three_probes_save_the_same_model(teacher_run):
    teacher_dir, _ = teacher_run
    models = [load_probe_classifier(str(teacher_dir / name)).ood_params for name in CLASSIFIER_FILES.values()]
    assert models[0] is not None and models[0] == models[1] == models[2]
    assert list(ood_summary(models[0])) == ["method", "n_components", "quantile", "threshold", "fitted_on",
                                            "threshold_on"]
    assert models[0]["quantile"] == 0.99 and models[0]["threshold"] > 0


def test_probe_reports_count_the_unfamiliar_images_of_their_splits(teacher_run):
    """Each probe's results give, for its evaluated splits, how many images its model flags (as computed here from the
    cached features of the test split, which the three probes evaluate), and report.md says so."""
    teacher_dir, _ = teacher_run
    report = (teacher_dir / "report.md").read_text()
    for probe, name in CLASSIFIER_FILES.items():
        params = load_probe_classifier(str(teacher_dir / name)).ood_params
        entries = read_results(teacher_dir, probe)["datasets"].values()
        assert all(list(entry["unfamiliar"]) == ["n_images", "share", "expected_share", "threshold"]
                   for entry in entries)
        (entry,) = [entry for entry in entries if entry["tag"] == "test"]
        _, unfamiliar = OodHead(params)(cached_feature_set(teacher_dir, "test").cls)
        share = float(unfamiliar.double().mean())
        assert entry["unfamiliar"] == {"n_images": int(unfamiliar.sum()), "share": share,
                                       "expected_share": pytest.approx(0.01), "threshold": params["threshold"]}
        assert (f"- test: {int(unfamiliar.sum())} of {len(unfamiliar)} images unfamiliar ({share:.1%}; about 1% "
                "expected of images like the training ones)") in report
