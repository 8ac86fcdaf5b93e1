"""Shared submitit plumbing of the evaluation launchers `dinov2/run/eval/{knn,linear,log_regression,predict,explain}.py`."""

import argparse
import importlib
import logging
from typing import Callable, Optional, Sequence, Type

import submitit

from dinov2.logging import setup_logging
from dinov2.run.submit import check_config_arguments, get_args_parser, submit_jobs

logger = logging.getLogger("dinov2")


class Evaluator:
    """The submitted task: runs `<module>.main(args)` of an evaluation CLI inside the job (requeued on preemption).
    Subclasses name the module."""

    module: str = ""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __call__(self) -> int:
        self._setup_args()
        return importlib.import_module(self.module).main(self.args)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        logger.info(f"Requeuing {self.args}")
        return submitit.helpers.DelayedSubmission(type(self)(self.args))

    def _setup_args(self) -> None:
        job_env = submitit.JobEnvironment()
        self.args.output_dir = self.args.output_dir.replace("%j", str(job_env.job_id))
        logger.info(f"Process group: {job_env.num_tasks} tasks, rank: {job_env.global_rank}")
        logger.info(f"Args: {self.args}")


def launch(
    description: str,
    get_eval_args_parser: Callable[..., argparse.ArgumentParser],
    task_class: Type[Evaluator],
    name: str,
    argv: Optional[Sequence[str]] = None,
) -> int:
    """Parse the submitit options + the evaluation CLI's options and submit `task_class(args)` as job `name`."""
    args_parser = get_args_parser(description=description, parents=[get_eval_args_parser(add_help=False)])
    args = args_parser.parse_args(argv)
    setup_logging()
    check_config_arguments(args)
    submit_jobs(task_class, args, name=name)
    return 0
