"""Submitit launcher of the explanation of a saved probe's decisions (`dinov2/eval/explain.py`), job name
dinov2:explain. The explanation runs in one process: submit it with --ngpus 1 --nodes 1."""

import sys
from typing import Optional, Sequence

from dinov2.eval.explain import get_args_parser as get_explain_args_parser
from dinov2.run.eval.launcher import Evaluator, launch


class ExplainEvaluator(Evaluator):
    module = "dinov2.eval.explain"


def main(argv: Optional[Sequence[str]] = None) -> int:
    description = "Submitit launcher for DINOv2 explanations of a saved probe's decisions"
    return launch(description, get_explain_args_parser, ExplainEvaluator, "dinov2:explain", argv)


if __name__ == "__main__":
    sys.exit(main())
