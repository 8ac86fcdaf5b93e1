"""Submitit launcher of the DINOv2 log-reg evaluation (`dinov2/eval/log_regression.py`), job name dinov2:logreg."""

import sys
from typing import Optional, Sequence

from dinov2.eval.log_regression import get_args_parser as get_log_regression_args_parser
from dinov2.run.eval.launcher import Evaluator, launch


class LogRegressionEvaluator(Evaluator):
    module = "dinov2.eval.log_regression"


def main(argv: Optional[Sequence[str]] = None) -> int:
    description = "Submitit launcher for DINOv2 logistic regression evaluation"
    return launch(description, get_log_regression_args_parser, LogRegressionEvaluator, "dinov2:logreg", argv)


if __name__ == "__main__":
    sys.exit(main())
