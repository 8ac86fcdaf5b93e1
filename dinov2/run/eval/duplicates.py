"""Submitit launcher of the near-duplicate check (`dinov2/eval/duplicates.py`), job name dinov2:duplicates."""

import sys
from typing import Optional, Sequence

from dinov2.eval.duplicates import get_args_parser as get_duplicates_args_parser
from dinov2.run.eval.launcher import Evaluator, launch


class DuplicatesEvaluator(Evaluator):
    module = "dinov2.eval.duplicates"


def main(argv: Optional[Sequence[str]] = None) -> int:
    description = "Submitit launcher for the DINOv2 near-duplicate check across and within datasets"
    return launch(description, get_duplicates_args_parser, DuplicatesEvaluator, "dinov2:duplicates", argv)


if __name__ == "__main__":
    sys.exit(main())
