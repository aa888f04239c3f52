"""train_net.py with faults injected, for tests: reproducible SIGKILLs at chosen points.

D2_TASKDISTILL_TEST_FAULTS="ROUND:RANK:WHERE:ITER,...": in restart round ROUND of a torchrun
group (TORCHELASTIC_RESTART_COUNT; 0 under launch()), rank RANK kills itself with SIGKILL
- WHERE "step": after iteration ITER (after the checkpoint of that iteration, if any);
- WHERE "save": half-way through writing the checkpoint of iteration ITER (rank 0 saves);
- WHERE "hang": inside iteration ITER, sleeps forever (the watchdog's case: a deadlock).
Each worker also records, once it has built its model, whether its teacher equals the
teacher's file tensor for tensor: OUTPUT_DIR/teacher_check_round{ROUND}_rank{RANK}.json.
"""
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train_net  # noqa: E402

from detectron2.engine import HookBase  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from d2_taskdistill import checkpoint  # noqa: E402
from d2_taskdistill.engine import DistillTrainer  # noqa: E402
from d2_taskdistill.hooks import unwrap  # noqa: E402
from d2_taskdistill.launch import torchrun_restart_count  # noqa: E402


def my_faults():
    plan = os.environ.get("D2_TASKDISTILL_TEST_FAULTS", "")
    faults = [item.split(":") for item in plan.split(",") if item]
    return [(where, int(it)) for rnd, rank, where, it in faults
            if int(rnd) == torchrun_restart_count() and int(rank) == comm.get_rank()]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfter(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            die()


class HangIn(HookBase):
    """Registered after the trainer's hooks: its before_step runs inside the watchdog's timed step."""

    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            hang_forever()


def hang_forever():
    while True:
        time.sleep(1)


class TeacherCheck(HookBase):
    def before_train(self):
        model = unwrap(self.trainer.model)
        saved = torch.load(model.teacher_origin.weights, map_location="cpu", weights_only=False)["model"]
        state = model.teacher.state_dict()
        same = state.keys() == saved.keys() and all(torch.equal(state[k].cpu(), saved[k]) for k in state)
        name = f"teacher_check_round{torchrun_restart_count()}_rank{comm.get_rank()}.json"
        with open(os.path.join(self.trainer.cfg.OUTPUT_DIR, name), "w") as f:
            json.dump({"bit_identical": bool(same), "start_iter": self.trainer.start_iter}, f)


def kill_while_saving(iteration):
    name = f"model_{iteration:07d}"
    save, torch_save = checkpoint.SafeCheckpointer.save, checkpoint.torch.save

    def half_then_die(data, f):
        torch_save(data, f)
        f.flush()
        f.truncate(f.tell() // 2)
        die()

    def save_with_fault(self, checkpoint_name, **kwargs):
        if checkpoint_name == name:
            checkpoint.torch.save = half_then_die
        return save(self, checkpoint_name, **kwargs)

    checkpoint.SafeCheckpointer.save = save_with_fault


_build_hooks = DistillTrainer.build_hooks


def build_hooks(self):
    hooks = [TeacherCheck(), *_build_hooks(self)]
    for where, iteration in my_faults():
        if where == "step":
            hooks.append(KillAfter(iteration))
        elif where == "save":
            kill_while_saving(iteration)
        elif where == "hang":
            hooks.append(HangIn(iteration))
        else:
            raise ValueError(f"D2_TASKDISTILL_TEST_FAULTS: unknown place {where!r}")
    return hooks


DistillTrainer.build_hooks = build_hooks

if __name__ == "__main__":
    train_net.invoke_main()
