import torch

from dinov2.layers import DropPath


def test_drop_path_eval_is_identity_and_training_drops_whole_samples():
    module = DropPath(0.5)
    x = torch.randn(400, 3, 2) + 5.0
    assert module.eval()(x) is x
    torch.manual_seed(0)
    y = module.train()(x)
    kept = (y != 0).flatten(1)
    assert bool((kept.all(1) | ~kept.any(1)).all())  # each sample kept or dropped as a whole
    kept_rows = kept.all(1)
    torch.testing.assert_close(y[kept_rows], x[kept_rows] * 2.0)  # 1 / keep_prob
    assert 120 < int(kept_rows.sum()) < 280
