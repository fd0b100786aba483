"""Test helper, started by torchrun from tests/test_distributed.py: `python -m bench.run` in which one
rank's training step raises, as a device error on one GPU would.

    torchrun ... tests/rank_failure.py RANK STEP [bench.run flags]

Rank RANK raises in its STEP-th training step (1-based, counted over the whole run), while the other
ranks are inside the same step's gradient all-reduce. The patch lives here, in the child process, so
the harness itself carries no test hook.
"""
import os
import sys
import time

import bench.train
from bench.run import main

fail_rank, fail_step = int(sys.argv[1]), int(sys.argv[2])
step = bench.train.Trainer.step


def failing_step(self, images, labels):
    if int(os.environ.get("RANK", "0")) == fail_rank and self.steps_done + 1 == fail_step:
        # the wall-clock time of the failure, so the test can tell how long the other ranks took to stop
        raise RuntimeError(f"injected failure on rank {fail_rank} at step {fail_step} at {time.time():.3f}")
    return step(self, images, labels)


bench.train.Trainer.step = failing_step
sys.exit(main(sys.argv[3:]))
