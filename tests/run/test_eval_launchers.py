"""dinov2.run.eval.{knn,linear,log_regression,predict,explain,duplicates}: submitit launchers submit the named job,
which runs the CLI."""

import importlib
import json

import pytest

import dinov2.distributed as distributed
from dinov2.data.sample_bbu import make_sample_bbu
from dinov2.run import submit
from dinov2.run.eval import launcher

CONFIG = "student:\n  arch: vit_tiny\n  patch_size: 16\ncrops:\n  global_crops_size: 32\n"


def probe_argv(config, output_dir, train="BBU:root=R:split=TRAIN", val="BBU:root=R:split=VAL"):
    return ["--config-file", str(config), "--pretrained-weights", "random", "--output-dir", str(output_dir),
            "--train-dataset", train, "--val-dataset", val, "--ngpus", "1", "--nodes", "1"]


@pytest.mark.parametrize(
    "module,job_name,eval_module",
    [("knn", "dinov2:knn", "dinov2.eval.knn"), ("linear", "dinov2:linear", "dinov2.eval.linear"),
     ("log_regression", "dinov2:logreg", "dinov2.eval.log_regression")],
)
def test_launcher_submits_the_named_job(monkeypatch, tmp_path, module, job_name, eval_module):
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    submitted = {}
    monkeypatch.setattr(launcher, "submit_jobs",
                        lambda task_class, args, name: submitted.update(task=task_class(args), name=name))
    run_module = importlib.import_module(f"dinov2.run.eval.{module}")
    assert run_module.main(probe_argv(config, tmp_path / "%j")) == 0
    task = submitted["task"]
    assert submitted["name"] == job_name and isinstance(task, launcher.Evaluator) and task.module == eval_module
    assert task.args.train_dataset_str == "BBU:root=R:split=TRAIN" and task.args.ngpus == 1
    assert task.args.threshold_policy == "f1" and task.args.output_dir == str(tmp_path / "%j")


def test_duplicates_launcher_submits_the_check(monkeypatch, tmp_path):
    submitted = {}
    monkeypatch.setattr(launcher, "submit_jobs",
                        lambda task_class, args, name: submitted.update(task=task_class(args), name=name))
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    run_module = importlib.import_module("dinov2.run.eval.duplicates")
    argv = ["--config-file", str(config), "--pretrained-weights", "random", "--output-dir", str(tmp_path), "--datasets",
            "A", "B", "--fail-on", "cross-split", "--ngpus", "1", "--nodes", "1"]
    assert run_module.main(argv) == 0
    task = submitted["task"]
    assert submitted["name"] == "dinov2:duplicates" and task.module == "dinov2.eval.duplicates"
    assert (task.args.dataset_strs, task.args.threshold, task.args.fail_on) == (["A", "B"], 0.95, "cross-split")


def test_missing_config_file_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(launcher, "submit_jobs", lambda *a, **k: pytest.fail("must not submit"))
    from dinov2.run.eval import knn

    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        knn.main(probe_argv(tmp_path / "nope.yaml", tmp_path))


def test_knn_job_runs_in_the_debug_executor(monkeypatch, tmp_path):
    root = tmp_path / "bbu"
    make_sample_bbu(str(root), groups=6, size=32, seed=0)
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    jobs = []

    def submit_debug(task_class, args, name):
        jobs.append(submit.submit_jobs(task_class, args, name, cluster="debug"))

    monkeypatch.setattr(launcher, "submit_jobs", submit_debug)
    from dinov2.run.eval import knn

    argv = probe_argv(config, tmp_path / "job_%j", f"BBU:root={root}:split=TRAIN", f"BBU:root={root}:split=TEST")
    knn.main([*argv, "--nb_knn", "2", "--resize-size", "32", "--crop-size", "32", "--num-workers", "0"])
    assert jobs[0].result() == 0
    results = json.loads((tmp_path / f"job_{jobs[0].job_id}" / "results_eval_knn.json").read_text())
    assert results["random_init"] is True and results["settings"]["k"] == 2


def fit_linear_probe(root, config, probe_dir) -> None:
    from dinov2.eval import linear

    try:
        linear.run_eval_linear(linear.get_args_parser().parse_args(
            ["--config-file", str(config), "--pretrained-weights", "random", "--output-dir", str(probe_dir),
             "--train-dataset", f"BBU:root={root}:split=TRAIN", "--val-dataset", f"BBU:root={root}:split=VAL",
             "--resize-size", "32", "--crop-size", "32", "--num-workers", "0", "--epochs", "1", "--epoch-length", "2",
             "--learning-rates", "0.1"]))
    finally:
        distributed.disable()


@pytest.mark.parametrize("module", ["predict", "explain"])
def test_jobs_apply_the_saved_classifier(monkeypatch, tmp_path, module):
    """dinov2.run.eval.{predict,explain} submit dinov2:{predict,explain}, which apply a linear probe's classifier
    inside the job."""
    root = tmp_path / "bbu"
    make_sample_bbu(str(root), groups=6, size=32, seed=0)
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    probe_dir = tmp_path / "probe"
    fit_linear_probe(root, config, probe_dir)
    jobs = []

    def submit_debug(task_class, args, name):
        jobs.append((name, submit.submit_jobs(task_class, args, name, cluster="debug")))

    monkeypatch.setattr(launcher, "submit_jobs", submit_debug)
    run_module = importlib.import_module(f"dinov2.run.eval.{module}")
    test = f"BBU:root={root}:split=TEST"
    extra = ["--num-workers", "0"] if module == "predict" else ["--select", "all"]
    assert run_module.main(["--config-file", str(config), "--pretrained-weights", "random", "--output-dir",
                            str(tmp_path / "job_%j"), "--classifier", str(probe_dir / "linear_classifier.pth"),
                            "--datasets", test, "--ngpus", "1", "--nodes", "1", *extra]) == 0
    ((name, job),) = jobs
    assert name == f"dinov2:{module}" and job.result() == 0
    if module == "predict":
        results = json.loads((tmp_path / f"job_{job.job_id}" / "predictions.json").read_text())
        assert results["probe"] == "linear" and results["datasets"][test]["n_images"] == 6
        assert results["eval_transform"] == {"resize_size": 32, "crop_size": 32, "draft_reducing_gap": 2.0}
    else:
        results = json.loads((tmp_path / f"job_{job.job_id}" / "explanations.json").read_text())
        selection = results["datasets"][test]["selection"]
        assert results["probe"] == "linear" and selection["n_explained"] == selection["n_groups"] == 2
        assert sum(group["n_images"] for group in results["datasets"][test]["groups"]) == 6


def test_explain_refuses_several_processes(monkeypatch, tmp_path):
    from dinov2.eval import explain

    monkeypatch.setenv("WORLD_SIZE", "2")
    args = explain.get_args_parser().parse_args(["--classifier", "c", "--datasets", "d", "--output-dir",
                                                 str(tmp_path)])
    with pytest.raises(ValueError, match="runs in one process, not 2"):
        explain.main(args)
