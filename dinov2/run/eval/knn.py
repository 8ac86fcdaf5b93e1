"""Submitit launcher of the DINOv2 k-NN evaluation (`dinov2/eval/knn.py`), job name dinov2:knn."""

import sys
from typing import Optional, Sequence

from dinov2.eval.knn import get_args_parser as get_knn_args_parser
from dinov2.run.eval.launcher import Evaluator, launch


class KnnEvaluator(Evaluator):
    module = "dinov2.eval.knn"


def main(argv: Optional[Sequence[str]] = None) -> int:
    description = "Submitit launcher for DINOv2 k-NN evaluation"
    return launch(description, get_knn_args_parser, KnnEvaluator, "dinov2:knn", argv)


if __name__ == "__main__":
    sys.exit(main())
