"""Submitit launcher of the DINOv2 linear evaluation (`dinov2/eval/linear.py`), job name dinov2:linear."""

import sys
from typing import Optional, Sequence

from dinov2.eval.linear import get_args_parser as get_linear_args_parser
from dinov2.run.eval.launcher import Evaluator, launch


class LinearEvaluator(Evaluator):
    module = "dinov2.eval.linear"


def main(argv: Optional[Sequence[str]] = None) -> int:
    description = "Submitit launcher for DINOv2 linear evaluation"
    return launch(description, get_linear_args_parser, LinearEvaluator, "dinov2:linear", argv)


if __name__ == "__main__":
    sys.exit(main())
