"""SLURM launcher of DINOv2 training (submitit): requeued on pre-emption/timeout, resumes from last_checkpoint.

    python -m dinov2.run.train.train --nodes 2 --ngpus 8 --partition P --config-file CFG --output-dir OUT [k=v ...]
"""

import argparse
import logging
import sys
from typing import Optional, Sequence

import submitit

from dinov2.logging import setup_logging
from dinov2.run.submit import check_config_arguments, get_args_parser, submit_jobs
from dinov2.train.train import get_args_parser as get_train_args_parser

logger = logging.getLogger("dinov2")


class Trainer:
    """The submitted callable: one instance per task (rank); `checkpoint()` requeues a fresh one."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self) -> None:
        from dinov2.train.train import main as train_main

        self._setup_args()
        train_main(self.args)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on pre-emption/timeout: requeue, resuming from the newest checkpoint."""
        logger.info(f"Requeuing {self.args}")
        args = argparse.Namespace(**vars(self.args))
        args.no_resume = False  # a requeued job must continue, even if the first start was --no-resume
        return submitit.helpers.DelayedSubmission(type(self)(args))

    def _setup_args(self) -> None:
        job_env = submitit.JobEnvironment()
        self.args.output_dir = self.args.output_dir.replace("%j", str(job_env.job_id))
        logger.info(f"Process group: {job_env.num_tasks} tasks, rank: {job_env.global_rank}")
        logger.info(f"Args: {self.args}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    parents = [get_train_args_parser(add_help=False)]
    args = get_args_parser(description="Submitit launcher for DINOv2 training", parents=parents).parse_args(argv)
    check_config_arguments(args)
    submit_jobs(Trainer, args, name="dinov2:train")
    return 0


if __name__ == "__main__":
    sys.exit(main())
