import socket

import pytest
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawn():
    """spawn(fn, world_size, *args): run fn(rank, world_size, port, *args) in `world_size` fresh CPU processes
    (CUDA hidden, so `dinov2.distributed.enable` picks gloo also on GPU machines)."""

    def run(fn, world_size, *args):
        with pytest.MonkeyPatch.context() as mpatch:
            mpatch.setenv("CUDA_VISIBLE_DEVICES", "")
            mp.spawn(fn, args=(world_size, _free_port(), *args), nprocs=world_size, join=True)

    return run
