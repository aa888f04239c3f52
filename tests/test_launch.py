"""Multi-process training on CPU workers (gloo), on both detectron2 versions:
the project's launch(), DefaultTrainer's DDP wrapping, checkpoints, evaluation
gathered on rank 0, and --resume.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import d2_taskdistill  # noqa: F401  (first: spawned workers import this module afresh)
from d2_taskdistill.launch import free_port, launch
from d2_taskdistill.lazy_engine import check_lazy_datasets_registered, load_lazy_config
from conftest import (ROOT, TINY_ROOT_ENV, distill_cfg, every_loss_cfg, lazy_config_for_tiny_cli, register_tiny_dataset,
                      subprocess_env)

# One method per detector trains under DDP and resumes (Faster R-CNN: every two-stage head loss at
# once); that every method reaches all its trainable tensors in a step (what DDP without
# find_unused_parameters needs) is tested per method in tests/test_distill_detector.py.
RESUMED = ["retinanet_tbd", "fcos_tid", "faster_rcnn_pkd_bckd_roi_kd"]


def _detector(name):
    return next(detector for detector in ("faster_rcnn", "retinanet", "fcos") if name.startswith(detector + "_"))


def _digest(tensor):
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _train_each(cfgs, teachers, out_dir, resume, keep=()):
    """A launch worker: DistillTrainer on each config; dumps digests of this rank's trainable
    weights, and removes each run's directory unless ``keep`` names it (checkpoints are 140 MB)."""
    import detectron2.utils.comm as comm
    from d2_taskdistill.engine import DistillTrainer
    from d2_taskdistill.hooks import unwrap

    register_tiny_dataset(os.environ[TINY_ROOT_ENV])
    rank = comm.get_rank()
    for name, cfg in cfgs.items():
        torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's
        trainer = DistillTrainer(cfg)
        trainer.resume_or_load(resume=resume)
        start_iter = trainer.start_iter
        trainer.train()  # DDP raises here if a parameter got no gradient in an iteration
        model = unwrap(trainer.model)
        # The teacher is compared here, not dumped: 24 dumps of it would take GBs of disk.
        teacher_ckpt = torch.load(teachers[_detector(name)], weights_only=False)["model"]
        teacher_now = model.teacher.state_dict()
        torch.save(
            {
                "start_iter": start_iter,
                "local_rank": comm.get_local_rank(),
                "threads": torch.get_num_threads(),
                "find_unused_parameters": trainer.model.find_unused_parameters,
                "world_size": comm.get_world_size(),
                "params": {k: _digest(v) for k, v in model.named_parameters()},
                "teacher_keys": sorted(teacher_now),
                "teacher_changed": [k for k, v in teacher_ckpt.items()
                                    if k not in teacher_now or not torch.equal(teacher_now[k], v)],
                "eval": trainer.last_eval_results,
            },
            os.path.join(out_dir, f"{name}_rank{rank}.pth"),
        )
        comm.synchronize()
        if rank == 0 and name not in keep:
            shutil.rmtree(cfg.OUTPUT_DIR)


def _configs(teachers, root, max_iter):
    cfgs = {}
    for name in RESUMED:
        detector = _detector(name)
        method = name[len(detector) + 1:]
        # 3 iterations: DDP reports a parameter left without gradient at the next forward.
        # Only model_final is written (resumed from); checkpoints are 140 MB each.
        cfgs[name] = distill_cfg(f"{detector}_R34-R18_{method}.yaml", teachers[detector], root / name,
                                 opts=["SOLVER.CHECKPOINT_PERIOD", 1000], max_iter=max_iter, device="cpu")
    return cfgs


def test_two_workers_train_and_resume_each_detector(teachers, rcnn_teacher, tiny_dataset, tmp_path):
    teachers = {**teachers, "faster_rcnn": rcnn_teacher}
    out = tmp_path / "dumps"
    out.mkdir()
    launch(_train_each, 2, dist_url="auto",
           args=(_configs(teachers, tmp_path, 3), teachers, str(out), False, RESUMED))
    # --resume from model_final (iteration 2) and train on to 5 iterations, one run per detector.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    resume_cfgs = {k: v for k, v in _configs(teachers, tmp_path, 5).items() if k in RESUMED}
    launch(_train_each, 2, dist_url="auto", args=(resume_cfgs, teachers, str(resumed), True))

    for name in _configs(teachers, tmp_path, 3):
        teacher_keys = sorted(torch.load(teachers[_detector(name)], weights_only=False)["model"])
        phases = [(out, 0)] + ([(resumed, 3)] if name in RESUMED else [])
        for phase, start_iter in phases:
            r0, r1 = (torch.load(phase / f"{name}_rank{r}.pth", weights_only=False) for r in range(2))
            assert (r0["start_iter"], r1["start_iter"]) == (start_iter, start_iter), name
            assert (r0["local_rank"], r1["local_rank"], r0["world_size"]) == (0, 1, 2)
            # The machine's cores are split between the two workers.
            assert r0["threads"] == r1["threads"] == max(1, os.cpu_count() // 2)
            # Every trainable tensor (student and adapters) is the same on both ranks.
            assert r0["params"].keys() == r1["params"].keys()
            assert r0["find_unused_parameters"] is False, name  # no method needs it
            for k in r0["params"]:
                assert r0["params"][k] == r1["params"][k], (name, k)
            # The teacher in every process is its checkpoint, bit for bit, after training.
            for rank_dump in (r0, r1):
                assert rank_dump["teacher_keys"] == teacher_keys, name
                assert rank_dump["teacher_changed"] == [], name
            # COCO evaluation gathers every rank's predictions on rank 0.
            assert set(r0["eval"]["bbox"]) >= {"AP", "AP50"}, name
            assert r1["eval"] == {}, name
    # Resuming changed the weights: training went on.
    before = torch.load(out / "retinanet_tbd_rank0.pth", weights_only=False)["params"]
    after = torch.load(resumed / "retinanet_tbd_rank0.pth", weights_only=False)["params"]
    assert any(before[k] != after[k] for k in before)


def _report_backend(out_dir):
    import torch.distributed as dist
    import detectron2.utils.comm as comm

    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump({"backend": str(dist.get_backend()), "world_size": comm.get_world_size(),
                   "local_rank": comm.get_local_rank()}, f)


def test_cpu_workers_use_gloo_where_cuda_exists(tmp_path, monkeypatch):
    """MODEL.DEVICE cpu on a machine with GPUs: detectron2's launch() would pick NCCL from
    torch.cuda.is_available(); the project's starts gloo workers."""
    import d2_taskdistill.launch as project_launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    detectron2_launches = []  # detectron2's launch() picks NCCL inside its workers there
    monkeypatch.setattr(project_launch, "d2_launch", lambda *a, **k: detectron2_launches.append(k))
    launch(_report_backend, 2, dist_url="auto", args=(str(tmp_path),), device="cuda")
    assert len(detectron2_launches) == 1
    launch(_report_backend, 2, dist_url="auto", args=(str(tmp_path),), device="cpu")
    assert len(detectron2_launches) == 1
    reports = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert reports == [{"backend": "gloo", "world_size": 2, "local_rank": r} for r in range(2)]


def _run_train_net(args, env, log):
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), *args]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def cli_opts(teacher, output_dir, max_iter):
    """train_net.py arguments: the tiny dataset declared in DATASETS.COCO, as a user would."""
    from conftest import SMALL_TEACHER_OPTS, tiny_run_opts

    root = os.environ[TINY_ROOT_ENV]
    declared = [("tiny_cli", os.path.join(root, "train.json"), os.path.join(root, "train"))]
    opts = [*tiny_run_opts(output_dir, max_iter, device="cpu"), "DATASETS.COCO", str(declared),
            "DATASETS.TRAIN", "('tiny_cli',)", "DATASETS.TEST", "('tiny_cli',)",
            "DISTILL.TEACHER.WEIGHTS", teacher,
            "DISTILL.TEACHER.OPTS", str(SMALL_TEACHER_OPTS), "DISTILL.TEACHER.EVAL_AT_START", "True"]
    return ["--config-file", os.path.join(ROOT, "configs", "digits", "retinanet_R34-R18_tbd.yaml"),
            *[str(o) for o in opts]]


def finish(proc, log, timeout=600):
    rc = proc.wait(timeout=timeout)
    text = open(log).read()
    assert rc == 0, text[-4000:]
    return text


def _iterations(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line)["iteration"] for line in f if '"total_loss"' in line]


def _env(tiny_dataset):
    return subprocess_env()


def test_train_net_num_gpus_2_a_killed_worker_stops_the_group_and_resume_finishes(teachers, tiny_dataset, tmp_path):
    """train_net.py --num-gpus 2 (launch(), gloo CPU workers): rank 1 is SIGKILLed after iteration 4
    of 6; rank 0 does not wait for it (the launcher ends the group, naming the dead process), and
    --resume goes on from the last checkpoint (iteration 3) to the end, the student evaluated with
    every rank's predictions gathered on rank 0."""
    out = tmp_path / "run"
    env = _env(tiny_dataset)
    args = ["--num-gpus", "2", *cli_opts(teachers["retinanet"], out, 6)]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "fault_train_net.py"), *args],
                            env=dict(env, D2_TASKDISTILL_TEST_FAULTS="0:1:step:4"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    # The bound: the group must end within the time limit (communicate raises past it), not
    # wait for the dead rank.
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    assert "process 1 terminated with signal SIGKILL" in text
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth" and (out / "model_0000001.pth").exists()
    assert (out / "log.txt.rank1").exists()  # detectron2 logs every rank
    assert "AP" in json.load(open(out / "teacher_eval.json"))["tiny_cli"]["bbox"]
    # The project's own lines reach the console and log.txt (rank 0), in detectron2's format.
    log = open(out / "log.txt").read()
    for line in (f"Loaded teacher weights from {teachers['retinanet']} (", "Distillation losses: TBD (",
                 "Datasets checked: tiny_cli, tiny_cli, 10 classes", "Teacher on tiny_cli: AP=",
                 "BatchNorm layers (NORM 'BN') with 2 processes"):
        assert line in text and line in log, line
    assert re.search(r"\[\d\d/\d\d \d\d:\d\d:\d\d\] d2td\.hooks INFO: Teacher on tiny_cli", log)

    text = finish(_run_train_net(["--resume", *args], env, tmp_path / "resume.log"), tmp_path / "resume.log")
    assert "Starting training from iteration 4" in text
    assert "Teacher on tiny_cli" not in text  # evaluated at the first start only
    assert "copypaste: AP,AP50" in text  # the student evaluated, results gathered on rank 0
    assert _iterations(out)[-1] == 5
    ckpt = torch.load(out / "model_final.pth", weights_only=False)
    assert ckpt["iteration"] == 5 and not any(k.startswith("teacher.") for k in ckpt["model"])


def test_train_net_lazy_config_num_gpus_2_on_cpu_trains_evaluates_resumes(teachers, tiny_dataset, tmp_path):
    config = lazy_config_for_tiny_cli(tmp_path / "my_tid.py", teachers["retinanet"])
    out = tmp_path / "run"
    env = _env(tiny_dataset)
    text = finish(_run_train_net(["--num-gpus", "2", "--config-file", config, f"train.output_dir={out}",
                                  "train.max_iter=3"], env, tmp_path / "first.log"), tmp_path / "first.log")
    assert (out / "model_final.pth").exists() and (out / "model_0000001.pth").exists()
    assert (out / "log.txt.rank1").exists() and (out / "config.yaml").exists()
    assert "AP" in json.load(open(out / "teacher_eval.json"))["tiny_cli"]["bbox"]
    assert (out / "inference_teacher" / "coco_instances_results.json").exists()  # apart from the student's
    assert "copypaste: AP,AP50" in text and "Datasets checked: tiny_cli, tiny_cli, 10 classes" in text
    ckpt = torch.load(out / "model_final.pth", weights_only=False)
    assert ckpt["iteration"] == 2 and not any(k.startswith("teacher.") for k in ckpt["model"])
    assert ckpt["teacher"]["weights"] == teachers["retinanet"]  # the teacher's identity, as on the yaml path

    # The run's config.yaml keeps no dataset registration (tiny_cli is registered by the .py only,
    # not in this process): it says so, and what to do.
    with pytest.raises(KeyError, match=r"datasets \['tiny_cli'\] \(dataloader.train.dataset.names\) are not "
                                       r"registered.*resume or evaluate with the .py config"):
        check_lazy_datasets_registered(load_lazy_config(str(out / "config.yaml")))
    text = finish(_run_train_net(["--num-gpus", "2", "--resume", "--config-file", config, f"train.output_dir={out}",
                                  "train.max_iter=5"], env, tmp_path / "resume.log"), tmp_path / "resume.log")
    assert "Starting training from iteration 3" in text
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 4


def test_train_net_two_machines_on_one_host(teachers, tiny_dataset, tmp_path):
    port = free_port()
    out = tmp_path / "run"
    env = _env(tiny_dataset)
    procs = [
        _run_train_net(["--num-gpus", "1", "--num-machines", "2", "--machine-rank", str(rank),
                        "--dist-url", f"tcp://127.0.0.1:{port}", *cli_opts(teachers["retinanet"], out, 3)],
                       env, tmp_path / f"machine{rank}.log")
        for rank in range(2)
    ]
    texts = [finish(p, tmp_path / f"machine{r}.log") for r, p in enumerate(procs)]
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 2
    assert re.search(r"Rank of current process: 1\. World size: 2", open(out / "log.txt.rank1").read())
    assert "copypaste: AP,AP50" in texts[0] and "copypaste: AP,AP50" not in texts[1]


def _distillation_losses(model, batch):
    """Every distillation term of ``model`` on ``batch``, the student's BatchNorm on its running
    statistics (as in eval) so that its features do not depend on the split either."""
    from detectron2.utils.events import EventStorage

    from d2_taskdistill.modeling.dense_outputs import run_dense_detector

    model.student.eval()
    gt = [x["instances"] for x in batch]
    sizes = model.image_sizes_on_device(batch)
    teacher = model.run_teacher(batch, gt, sizes)
    student = run_dense_detector(model.student, batch, gt, model.fcos_thresholds, sizes).to_float32()
    with EventStorage(0), torch.no_grad():
        return {k: float(v) for loss in model.distill_losses.values() for k, v in loss(student, teacher).items()}


def _losses_on_my_share(cfgs, state_paths, batch, out_dir):
    import detectron2.utils.comm as comm
    from detectron2.modeling import build_model

    share = batch[2 * comm.get_rank(): 2 * comm.get_rank() + 2]
    for detector, cfg in cfgs.items():
        model = build_model(cfg)
        model.load_state_dict(torch.load(state_paths[detector], weights_only=False))
        with open(os.path.join(out_dir, f"{detector}_rank{comm.get_rank()}.json"), "w") as f:
            json.dump(_distillation_losses(model, share), f)


def test_losses_do_not_depend_on_how_the_batch_is_split(teachers, tiny_batch, tmp_path):
    """4 images in one process, or 2 in each of 2, every loss on each detector: every loss's
    normaliser is averaged over the processes, so the mean of the two processes' losses (what DDP
    optimises) is the one-process loss, to float32 rounding (rtol 1e-5). PKD with its public
    code's batch statistics (NORMALIZE_OVER batch_hw) depends on the split by design; its
    per-sample variant is tested."""
    from detectron2.modeling import build_model

    cfgs, state_paths, references = {}, {}, {}
    for detector in ("retinanet", "fcos"):
        cfgs[detector] = every_loss_cfg(detector, teachers[detector], tmp_path, device="cpu",
                                        opts=["DISTILL.PKD.NORMALIZE_OVER", "hw"])
        torch.manual_seed(0)
        model = build_model(cfgs[detector])
        state_paths[detector] = str(tmp_path / f"{detector}_state.pth")
        torch.save(model.state_dict(), state_paths[detector])
        references[detector] = _distillation_losses(model, tiny_batch)
    launch(_losses_on_my_share, 2, dist_url="auto", args=(cfgs, state_paths, tiny_batch, str(tmp_path)), device="cpu")
    for detector, reference in references.items():
        ranks = [json.load(open(tmp_path / f"{detector}_rank{r}.json")) for r in range(2)]
        assert set(reference) == set(ranks[0]) and len(reference) >= 15, detector
        for name, value in reference.items():
            assert (ranks[0][name] + ranks[1][name]) / 2 == pytest.approx(value, rel=1e-5), (detector, name)
        # Each process's own value differs: the test compares something that depends on the split.
        assert any(ranks[0][n] != pytest.approx(ranks[1][n], rel=1e-3) for n in reference), detector


def _torchrun(args, env, log, script="train_net.py", max_restarts=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(max_restarts), os.path.join(ROOT, script), *args]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def test_a_missing_peer_is_waited_for_a_bounded_configurable_time(teachers, tiny_dataset, tmp_path):
    """Machine 0 of 2 started alone (its peer died before joining): --dist-timeout bounds the wait."""
    import time

    port = free_port()
    out = tmp_path / "run"
    started = time.monotonic()
    proc = _run_train_net(["--num-gpus", "1", "--num-machines", "2", "--machine-rank", "0", "--dist-timeout", "0.1",
                           "--dist-url", f"tcp://127.0.0.1:{port}", *cli_opts(teachers["retinanet"], out, 3)],
                          _env(tiny_dataset), tmp_path / "alone.log")
    rc = proc.wait(timeout=240)
    waited = time.monotonic() - started
    assert rc != 0 and waited < 120, (rc, waited)
    assert "imeout" in open(tmp_path / "alone.log").read() or "timed out" in open(tmp_path / "alone.log").read()


# Faults of the test below, one per restart round: (round, rank, where, iteration).
FAULTS = [(0, 1, "step", 2), (1, 0, "save", 5), (2, 1, "step", 7), (3, 1, "hang", 8)]
# The watchdog's limit in that test: well above a tiny step (and 20 of them), short enough to wait for.
HANG_LIMIT_S = 15


def test_torchrun_survives_a_fault_in_each_round(teachers, tiny_dataset, tmp_path):
    """Four faults in successive rounds of one torchrun job (10 iterations, a checkpoint every
    2): SIGKILLs after iteration 2 (rank 1), half-way through writing the checkpoint of iteration
    5 (rank 0), after iteration 7 (rank 1), then rank 1 hangs inside iteration 8 (sleeps forever):
    its watchdog stops it with its stacks in its log and exit code 124, and torchrun stops rank 0,
    which waits for it in DDP's all-reduce. Each round is one run of world size 2 whose workers meet through
    torchrun's environment (env://), not two runs of world size 1 racing into one OUTPUT_DIR;
    torchrun restarts the group, which resumes from its last complete checkpoint by itself. The
    job reaches MAX_ITER; every checkpoint on disk loads; no fault costs more than
    CHECKPOINT_PERIOD iterations; every worker of every round holds the teacher of its file, bit
    for bit; the teacher's and the final evaluation are written once. (The figures are in docs/distributed.md.)"""
    import time

    out = tmp_path / "run"
    plan = ",".join(":".join(map(str, f)) for f in FAULTS)
    env = dict(_env(tiny_dataset), D2_TASKDISTILL_TEST_FAULTS=plan)
    started = time.monotonic()
    text = finish(_torchrun([*cli_opts(teachers["retinanet"], out, 10), "SOLVER.WATCHDOG_SECONDS", str(HANG_LIMIT_S)],
                            env, tmp_path / "faults.log", script="tests/fault_train_net.py",
                            max_restarts=len(FAULTS)), tmp_path / "faults.log")
    print(f"torchrun job with {len(FAULTS)} faults: {time.monotonic() - started:.0f} s")
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 9
    assert "[d2_taskdistill] torchrun worker: rank 1 of 2 (local 1 of 2), restart 1, gloo" in text
    log = open(out / "log.txt").read()
    assert log.count("Rank of current process: 0. World size: 2") == len(FAULTS) + 1
    rank1_log = open(out / "log.txt.rank1").read()
    assert "Rank of current process: 1. World size: 2" in rank1_log
    assert re.search(r"Loading from .*model_0000003\.pth", log)  # round 2: the save of 5 was killed
    # The hang: both ranks time iteration 8 alike, and the first watchdog to look fires: rank 1's
    # (the one that hangs) or rank 0's (which waits for it in DDP's all-reduce); either way the
    # launcher stops the other, and rank 1's stacks (written at SIGTERM if it did not fire) reach
    # the job's output.
    fired = [re.search(rf"Rank {rank}: iteration 8 has not finished after (\d+) s \(the limit is the larger of "
                       rf"SOLVER.WATCHDOG_SECONDS={HANG_LIMIT_S} s and 20 x the median step, "
                       r"(?:([\d.]+) s|none finished yet)\).*Exiting with code 124", rank_log, re.S)
             for rank, rank_log in enumerate([log, rank1_log])]
    hung = fired[0] or fired[1]
    assert hung, (log[-2000:], rank1_log[-2000:])
    # Round 3 starts from 7 or 5 (see below): iteration 8 may be its first step, with no median yet.
    limit = max(HANG_LIMIT_S, 20 * float(hung.group(2) or 0))
    assert limit <= int(hung.group(1)) + 0.5 < limit + 5  # the watchdog looks every 1.5 s
    assert "in hang_forever" in text
    # Rank 0 alone writes events: at most one file per round (v0.6 opens it at start, upstream at
    # its first write).
    assert 1 <= len([f for f in os.listdir(out) if f.startswith("events.out")]) <= len(FAULTS) + 1
    for name in os.listdir(out):
        if name.endswith(".pth"):
            assert "model" in torch.load(out / name, weights_only=False), name
    starts = [int(s) for s in re.findall(r"Starting training from iteration (\d+)", text)]
    # Round 0 from scratch, then from checkpoints 1 and 3 (the save of 5 was killed), then from 7
    # or 5: rank 0 may or may not finish saving iteration 7 before torchrun stops it; then from 7.
    assert starts[:3] == [0, 2, 4] and starts[3] in (6, 8) and starts[4] == 8, starts
    trained_last = [2, 5, 7, 7]  # the last iteration each round completed (5: killed while saving it)
    lost = [last + 1 - start for last, start in zip(trained_last, starts[1:])]
    assert max(lost) <= 2, lost  # CHECKPOINT_PERIOD
    checks = [json.load(open(out / f"teacher_check_round{r}_rank{k}.json"))
              for r in range(len(FAULTS) + 1) for k in range(2)]
    assert all(c["bit_identical"] for c in checks)
    with open(out / "metrics.json") as f:
        evaluations = [json.loads(line) for line in f if "bbox/AP" in line]
    assert len(evaluations) == 1  # the final one, after MAX_ITER
    assert text.count("Teacher on tiny_cli: AP=") == 1  # at the first start only
