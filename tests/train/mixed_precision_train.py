"""`dinov2/train/train.py` with `compute_precision` applied on the CPU (in production it applies on CUDA only), for
the tests' torchrun jobs of the mixed-precision path."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dinov2.train import ssl_meta_arch, train  # noqa: E402

if __name__ == "__main__":
    ssl_meta_arch.mixed_precision_enabled = lambda: True
    train.main(train.get_args_parser(add_help=True).parse_args())
    train.distributed.exit_now(0)
