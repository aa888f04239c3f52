"""Two gloo processes train TaskDistillDetector under DDP the way DistillTrainer wraps it.

detectron2 v0.6's launch() asserts CUDA, so the test spawns the processes itself.
"""
import os

import d2_taskdistill  # noqa: F401  (first: spawned workers import this module afresh)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from detectron2.engine.defaults import create_ddp_model
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from d2_taskdistill.engine import DistillTrainer
from conftest import distill_cfg, make_teacher_checkpoint


def _worker(rank, world_size, init_file, cfg, batches, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's
        model = build_model(cfg)
        optimizer = DistillTrainer.build_optimizer(cfg, model)
        # As DefaultTrainer does; on CPU, detectron2's device_ids default does not apply.
        model = create_ddp_model(model, broadcast_buffers=False, device_ids=None)
        model.train()
        with EventStorage(0) as storage:
            for it in range(3):
                storage.iter = it
                losses = model(batches[rank::world_size])
                optimizer.zero_grad()
                sum(losses.values()).backward()
                optimizer.step()
        params = {k: v.detach() for k, v in model.module.named_parameters()}
        torch.save({"params": params, "losses": {k: float(v) for k, v in losses.items()}},
                   os.path.join(out_dir, f"rank{rank}.pth"))
    finally:
        dist.destroy_process_group()


def test_two_process_ddp(tmp_path, tiny_batch):
    teacher = make_teacher_checkpoint("retinanet", str(tmp_path / "teacher.pth"), tiny_batch)
    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teacher, tmp_path)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), cfg, tiny_batch, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in range(2))
    assert "loss_distill_fitnet" in r0["losses"] and "loss_distill_fitnet" in r1["losses"]
    # Different data per rank, identical parameters: gradients were all-reduced.
    assert r0["losses"]["loss_cls"] != r1["losses"]["loss_cls"]
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:
        assert torch.allclose(r0["params"][k], r1["params"][k], atol=1e-6), k
