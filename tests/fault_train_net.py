"""train_net.py with a fault injected, for tests: on the first start of a torchrun group
(TORCHELASTIC_RESTART_COUNT 0), the rank named by D2_TASKDISTILL_TEST_KILL_RANK kills itself
with SIGKILL after iteration D2_TASKDISTILL_TEST_KILL_AFTER_ITER, as a preempted or crashed
worker would die."""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_net  # noqa: E402

from detectron2.engine import HookBase  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from d2_taskdistill.engine import DistillTrainer  # noqa: E402
from d2_taskdistill.launch import torchrun_restart_count  # noqa: E402


class KillAfter(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)


_build_hooks = DistillTrainer.build_hooks


def build_hooks(self):
    hooks = _build_hooks(self)
    rank = int(os.environ.get("D2_TASKDISTILL_TEST_KILL_RANK", "-1"))
    if torchrun_restart_count() == 0 and comm.get_rank() == rank:
        hooks.append(KillAfter(int(os.environ["D2_TASKDISTILL_TEST_KILL_AFTER_ITER"])))
    return hooks


DistillTrainer.build_hooks = build_hooks

if __name__ == "__main__":
    train_net.invoke_main()
