"""Submitit launcher of the scoring of new images with a saved probe (`dinov2/eval/predict.py`), job name
dinov2:predict."""

import sys
from typing import Optional, Sequence

from dinov2.eval.predict import get_args_parser as get_predict_args_parser
from dinov2.run.eval.launcher import Evaluator, launch


class PredictEvaluator(Evaluator):
    module = "dinov2.eval.predict"


def main(argv: Optional[Sequence[str]] = None) -> int:
    description = "Submitit launcher for DINOv2 predictions with a saved probe"
    return launch(description, get_predict_args_parser, PredictEvaluator, "dinov2:predict", argv)


if __name__ == "__main__":
    sys.exit(main())
