import argparse
import os

import pytest
import submitit

from dinov2.configs import ConfigError
from dinov2.run.submit import build_executor, get_args_parser, submit_jobs
from dinov2.run.train import train as slurm_train
from dinov2.train.train import get_args_parser as get_train_args_parser

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE_CONFIG = os.path.join(REPO, "dinov2", "configs", "train", "bbu_sample.yaml")


def _parse(argv):
    parents = [get_train_args_parser(add_help=False)]
    return get_args_parser(description="test", parents=parents).parse_args(argv)


def test_cli_defaults_and_aliases(tmp_path):
    args = _parse(["--config-file", SAMPLE_CONFIG, "--output-dir", str(tmp_path), "optim.epochs=1"])
    assert (args.ngpus, args.nodes, args.timeout, args.partition) == (8, 1, 2800, None)
    assert (args.use_volta32, args.comment, args.exclude) == (False, "", "")
    assert args.opts == ["optim.epochs=1"]
    args = _parse(["--gpus-per-node", "4", "--nnodes", "3", "--config-file", SAMPLE_CONFIG])
    assert (args.ngpus, args.nodes) == (4, 3)
    # without a parent defining it, the submit parser has its own --output-dir
    assert get_args_parser().parse_args(["--output_dir", "x"]).output_dir == "x"


def test_without_slurm_several_tasks_are_refused_and_counts_checked(tmp_path):
    """submitit's local executor (no sbatch) would start independent one-process runs: refused beyond one task."""
    args = _parse(["--ngpus", "2", "--config-file", SAMPLE_CONFIG, "--output-dir", str(tmp_path / "%j")])
    with pytest.raises(ValueError, match=r"no SLURM here .* would start 2 separate one-process runs .* "
                                         r"--nproc_per_node=2"):  # fmt: skip
        build_executor(args, name="dinov2:train", cluster="local")
    args.ngpus = 1
    assert build_executor(args, name="dinov2:train", cluster="local").cluster == "local"
    args.ngpus = 0
    with pytest.raises(ValueError, match="--ngpus and --nodes must be at least 1, got 0 and 1"):
        build_executor(args, name="dinov2:train", cluster="local")


def test_job_folder_with_the_job_id_in_its_name_leaves_no_stray_folder(tmp_path):
    args = _parse(["--ngpus", "1", "--config-file", SAMPLE_CONFIG, "--output-dir", str(tmp_path / "runs" / "a_%j")])
    build_executor(args, name="dinov2:train", cluster="debug")
    assert os.listdir(tmp_path / "runs") == []  # the job's own folder comes with the job id; no "a_"


def test_slurm_parameters_and_sbatch_script(tmp_path, monkeypatch):
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun on this machine
    args = _parse([
        "--nodes", "2", "--ngpus", "8", "--partition", "learnlab", "--timeout", "600", "--use-volta32",
        "--comment", "deadline", "--exclude", "node7", "--config-file", SAMPLE_CONFIG,
        "--output-dir", str(tmp_path / "%j"),
    ])
    executor = build_executor(args, name="dinov2:train", cluster="slurm")
    slurm = executor._executor
    assert isinstance(slurm, submitit.SlurmExecutor)
    assert slurm.max_num_timeout == 30
    params = slurm.parameters
    expected = {
        "job_name": "dinov2:train", "mem": "0GB", "gpus_per_node": 8, "ntasks_per_node": 8, "cpus_per_task": 10,
        "nodes": 2, "time": 600, "partition": "learnlab", "signal_delay_s": 120, "constraint": "volta32gb",
        "comment": "deadline", "exclude": "node7",
    }
    assert {k: params[k] for k in expected} == expected
    script = slurm._make_submission_file_text("python -c pass", "uid")
    for line in (
        "#SBATCH --job-name=dinov2:train", "#SBATCH --mem=0GB", "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=8", "#SBATCH --cpus-per-task=10", "#SBATCH --nodes=2", "#SBATCH --time=600",
        "#SBATCH --partition=learnlab", "#SBATCH --signal=USR2@120", "#SBATCH --constraint=volta32gb",
        "#SBATCH --exclude=node7", "#SBATCH --open-mode=append",
    ):
        assert line in script.splitlines(), line


def test_trainer_checkpoint_requeues_a_resuming_trainer(tmp_path):
    args = argparse.Namespace(output_dir=str(tmp_path), no_resume=True, config_file=SAMPLE_CONFIG, opts=[])
    delayed = slurm_train.Trainer(args).checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    trainer = delayed.function
    assert isinstance(trainer, slurm_train.Trainer)
    assert trainer.args.no_resume is False and args.no_resume is True  # the original args are untouched
    assert trainer.args.output_dir == str(tmp_path)


def test_debug_executor_runs_training_in_process(tmp_path, monkeypatch):
    """submitit's debug executor runs Trainer() here: %j is replaced and train main() gets the parsed args."""
    seen = {}
    monkeypatch.setattr("dinov2.train.train.main", lambda a: seen.setdefault("args", a))
    args = _parse(["--config-file", SAMPLE_CONFIG, "--output-dir", str(tmp_path / "job_%j"), "optim.epochs=1"])
    job = submit_jobs(slurm_train.Trainer, args, name="dinov2:train", cluster="debug")
    job.result()
    assert seen["args"].output_dir == str(tmp_path / f"job_{job.job_id}")
    assert seen["args"].opts == ["optim.epochs=1"] and seen["args"].config_file == SAMPLE_CONFIG


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        slurm_train.main(["--config-file", str(tmp_path / "nope.yaml"), "--output-dir", str(tmp_path)])


@pytest.mark.parametrize("overrides, error, message", [
    (["optim.epoch=3"], ConfigError, r"Unknown config key 'optim\.epoch' in command-line overrides"),
    (["optim.epochs=3", "--nodes", "2"], ValueError, r"--nodes comes after the key=value overrides "
                                                     r"\['optim\.epochs=3'\], which take the rest"),
])
def test_bad_overrides_are_refused_before_the_job_is_queued(tmp_path, monkeypatch, overrides, error, message):
    """Found at once, not when the job starts after its wait in the queue."""
    monkeypatch.setattr(slurm_train, "submit_jobs", lambda *a, **k: pytest.fail("must not submit"))
    with pytest.raises(error, match=message):
        slurm_train.main(["--config-file", SAMPLE_CONFIG, "--output-dir", str(tmp_path / "%j"), *overrides])
