"""SLURM submission through submitit: the cluster options shared by the training and evaluation launchers."""

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import submitit

from dinov2.utils.config import get_cfg_from_args

logger = logging.getLogger("dinov2")

CPUS_PER_TASK = 10
SIGNAL_DELAY_S = 120  # time between SLURM's USR2 pre-emption/timeout signal and the kill: enough to requeue
MAX_NUM_TIMEOUT = 30  # how often a job may be requeued after a timeout


def _has_option(parsers: List[argparse.ArgumentParser], option: str) -> bool:
    return any(option in action.option_strings for p in parsers for action in p._actions)


def get_args_parser(
    description: Optional[str] = None,
    parents: Optional[List[argparse.ArgumentParser]] = None,
    add_help: bool = True,
) -> argparse.ArgumentParser:
    parents = parents or []
    parser = argparse.ArgumentParser(description=description, parents=parents, add_help=add_help)
    parser.add_argument("--ngpus", "--gpus", "--gpus-per-node", default=8, type=int, help="Number of GPUs per node")
    parser.add_argument("--nodes", "--nnodes", default=1, type=int, help="Number of nodes")
    parser.add_argument("--timeout", default=2800, type=int, help="Duration of the job, in minutes")
    parser.add_argument("--partition", default=None, type=str, help="SLURM partition (default: the cluster's)")
    parser.add_argument("--use-volta32", action="store_true", help="Request V100-32GB GPUs (constraint volta32gb)")
    parser.add_argument("--comment", default="", type=str, help="Comment to pass to scheduler, e.g. priority message")
    parser.add_argument("--exclude", default="", type=str, help="Nodes to exclude")
    if not _has_option(parents, "--output-dir"):
        parser.add_argument("--output-dir", "--output_dir", default="", type=str, help="Job folder (%%j = job id)")
    return parser


def get_executor_parameters(args: argparse.Namespace, name: str) -> Dict[str, Any]:
    """submitit parameters of one job: `ngpus` tasks per node with one GPU and CPUS_PER_TASK CPUs each."""
    params: Dict[str, Any] = dict(
        name=name,
        mem_gb=0,
        gpus_per_node=args.ngpus,
        tasks_per_node=args.ngpus,  # one task per GPU
        cpus_per_task=CPUS_PER_TASK,
        nodes=args.nodes,
        timeout_min=args.timeout,
        slurm_signal_delay_s=SIGNAL_DELAY_S,
    )
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.use_volta32:
        params["slurm_constraint"] = "volta32gb"
    if args.comment:
        params["slurm_comment"] = args.comment
    if args.exclude:
        params["slurm_exclude"] = args.exclude
    return params


def check_config_arguments(args: argparse.Namespace) -> None:
    """Check the job's --config-file and key=value overrides before it is queued (a typo would otherwise be found
    only when the job starts, after the wait): the file exists, every override is key=value of a known key, and no
    launcher option was swallowed by the overrides (they come last)."""
    if not args.config_file or not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file {args.config_file!r} does not exist")
    opts = list(getattr(args, "opts", None) or [])
    options = [opt for opt in opts if opt.startswith("-")]
    if options:
        raise ValueError(f"{options[0]} comes after the key=value overrides {opts[:opts.index(options[0])]}, which "
                         "take the rest of the command line: put the options first")  # fmt: skip
    get_cfg_from_args(argparse.Namespace(config_file=args.config_file, opts=opts))


def _existing_part(folder: str) -> str:
    """The folders of `folder` above the first one whose name holds the job id `%j` (submitit makes that one): not a
    stray `run_` for `run_%j`."""
    if "%j" not in folder:
        return folder
    return os.path.dirname(folder.split("%j")[0]) or os.sep


def build_executor(args: argparse.Namespace, name: str, cluster: Optional[str] = None) -> submitit.AutoExecutor:
    """AutoExecutor writing its files to `args.output_dir` (default `outputs/slurm/%j`); `cluster="debug"` runs
    the job in this process, `"slurm"` forces SLURM even where sbatch is absent (to inspect the script).

    Where there is no SLURM, submitit falls back to its local executor, which starts the tasks as separate processes
    without the variables this codebase's distributed setup reads: each would train alone, all into the same files.
    More than one task there is refused, pointing to torchrun instead."""
    if args.ngpus < 1 or args.nodes < 1:
        raise ValueError(f"--ngpus and --nodes must be at least 1, got {args.ngpus} and {args.nodes}")
    if not args.output_dir:
        args.output_dir = os.path.join("outputs", "slurm", "%j")
    args.output_dir = os.path.abspath(args.output_dir)
    Path(_existing_part(args.output_dir)).mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=args.output_dir, cluster=cluster, slurm_max_num_timeout=MAX_NUM_TIMEOUT)
    n_tasks = args.ngpus * args.nodes
    if executor.cluster == "local" and n_tasks > 1:
        raise ValueError(
            f"no SLURM here (sbatch not found): submitit's local executor would start {n_tasks} separate one-process "
            f"runs writing the same files. On one machine use torchrun (NPROC={args.ngpus} bash run/train/train.sh, "
            f"or python -m torch.distributed.run --nproc_per_node={args.ngpus} ...), or pass --ngpus 1 --nodes 1"
        )
    executor.update_parameters(**get_executor_parameters(args, name))
    return executor


def submit_jobs(
    task_class: Callable[[argparse.Namespace], Callable[[], Any]],
    args: argparse.Namespace,
    name: str,
    cluster: Optional[str] = None,
) -> submitit.Job:
    executor = build_executor(args, name, cluster=cluster)
    job = executor.submit(task_class(args))
    logger.info(f"Submitted job_id: {job.job_id}")
    logger.info(f"Logs and checkpoints will be saved at: {args.output_dir}")
    return job
