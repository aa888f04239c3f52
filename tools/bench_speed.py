#!/usr/bin/env python
"""Distillation overhead: time per iteration and peak memory of student training, teacher
inference and distillation training per method, with a breakdown of the distillation step.
Writes benchmarks/speed.md and benchmarks/speed.json.

    python tools/bench_speed.py                  # make bench-speed
    python tools/bench_speed.py --iters 20 --sizes 128 256 --batches 1 2 4
    python tools/bench_speed.py --methods TBD --no-scaling --opts DISTILL.TBD.LOG_PERIOD 1

Each measurement runs in its own process (peak RSS is per process); times are medians of
--iters iterations after --warmup. Models use random weights: speed does not depend on them.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# label -> (DISTILL.LOSSES, extra config options)
METHODS = {
    "FITNET": (["FITNET"], []),
    "FGFI": (["FGFI"], []),
    "TID": (["TID"], []),
    "TBD": (["TBD"], []),
    "BCKD": (["BCKD"], []),
    "BCKD+TID": (["BCKD", "TID"], []),
    # bfloat16 autocast on CPU (float16 on CUDA): worth it only where the CPU has bf16 units;
    # not in the default run (on this machine, without them, a first teacher forward took 96 s).
    "TID, bf16 teacher": (["TID"], ["DISTILL.TEACHER.AMP", "True"]),
}
DEFAULT_METHODS = [m for m in METHODS if "bf16" not in m]


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind, losses, size, batch, iters, warmup, detector, opts=()):
    """One measurement in this process: {'step': s, 'breakdown': {...}, 'peak_mb': MB}."""
    import torch

    import d2_taskdistill  # noqa: F401
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    from d2_taskdistill import load_config
    from d2_taskdistill.modeling.dense_outputs import run_dense_detector

    torch.manual_seed(0)
    base_rss = rss_mb()
    digits = os.path.join(ROOT, "configs", "digits")
    sizes = ["INPUT.MIN_SIZE_TRAIN", f"({size},)", "INPUT.MAX_SIZE_TRAIN", size, "MODEL.DEVICE", "cpu"]
    batch_inputs = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(batch):
        inst = Instances((size, size))
        xy = torch.rand(4, 2, generator=gen) * size * 0.7
        wh = torch.rand(4, 2, generator=gen) * size * 0.3 + 8
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 10, (4,), generator=gen)
        batch_inputs.append({"image": torch.rand(3, size, size, generator=gen) * 255, "instances": inst})

    times = {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - start)
        return out

    if kind == "teacher":
        cfg = load_config(os.path.join(digits, f"{detector}_R34_FPN_teacher.yaml"), sizes)
        model = build_model(cfg).eval()
        step = lambda: timed("step", lambda: torch.no_grad()(run_dense_detector)(model, batch_inputs))
    else:
        if kind == "student":
            cfg = load_config(os.path.join(digits, f"{detector}_R18_FPN_student.yaml"), sizes)
            model = build_model(cfg)
        else:
            teacher_cfg = load_config(os.path.join(digits, f"{detector}_R34_FPN_teacher.yaml"), sizes)
            weights = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_speed_{detector}_teacher")
            if not os.path.exists(weights + ".pth"):
                DetectionCheckpointer(build_model(teacher_cfg), save_dir=os.path.dirname(weights)).save(
                    os.path.basename(weights))
            cfg = load_config(os.path.join(digits, f"{detector}_R34-R18_tid.yaml"),
                              [*sizes, "DISTILL.LOSSES", losses, "DISTILL.TEACHER.WEIGHTS", weights + ".pth",
                               "DISTILL.TEACHER.OPTS", sizes, *opts])
            model = build_model(cfg)
        model.train()
        # lr 0: the step costs the same, and random-weight models cannot diverge over the iterations.
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)

        def distill_forward():
            gt = [x["instances"] for x in batch_inputs]
            student = timed("student forward", lambda: run_dense_detector(model.student, batch_inputs, gt, model.fcos_thresholds))
            teacher = timed("teacher forward", lambda: model.run_teacher(batch_inputs, gt))
            loss = timed("student losses", lambda: dict(student.detector_losses()))
            for name, module in model.distill_losses.items():
                loss.update(timed(f"masks + loss {name}", lambda: module(student, teacher)))
            return loss

        forward = model if kind == "student" else distill_forward

        def train_step():
            losses = forward(batch_inputs) if kind == "student" else forward()
            total = sum(losses.values())
            optimizer.zero_grad()
            timed("backward + step", lambda: (total.backward(), optimizer.step()))

        step = lambda: timed("step", train_step)

    with EventStorage(0):
        for i in range(warmup + iters):
            if i == warmup:
                times.clear()
            step()
    result = {name: statistics.median(v) for name, v in times.items()}
    return {"step": result.pop("step"), "breakdown": result, "peak_mb": peak_rss_mb() - base_rss}


def run_child(args, kind, losses, size, batch, opts=()):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--losses", *(losses or ["-"]),
           "--size", str(size), "--batch", str(batch), "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--detector", args.detector, "--opts", *opts]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measurement {kind} {losses} {size}px x{batch} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fitted_exponent(points):
    """Slope of log(time) against log(pixels); None with fewer than two pixel counts."""
    import numpy as np

    x, y = zip(*points)
    if len(set(x)) < 2:
        return None
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", default="retinanet", choices=["retinanet", "fcos"])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                        help="distillation runs at the goal point (batch 4, 256 px)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the batch / size sweep")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config options added to every distillation run, e.g. DISTILL.TBD.LOG_PERIOD 1")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "speed"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--losses", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        losses = [] if args.losses == ["-"] else args.losses
        print(json.dumps(measure(args.child, losses, args.size, args.batch, args.iters, args.warmup, args.detector,
                                 args.opts)))
        return 0

    import torch

    start = time.perf_counter()
    report = {"command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads", "detector": args.detector, "points": []}

    def record(kind, losses, size, batch, opts=(), label=None):
        opts = [*opts, *args.opts] if kind == "distill" else []
        point = run_child(args, kind, losses, size, batch, opts)
        label = label or "+".join(losses) or "-"
        point.update(kind=kind, losses=losses, label=label, opts=opts, size=size, batch=batch)
        report["points"].append(point)
        print(f"[speed] {kind:8s} {label:18s} {size:4d}px x{batch}: "
              f"{point['step']:.3f} s, peak +{point['peak_mb']:.0f} MB", flush=True)
        return point

    # Methods at the goal point (batch 4, 256 px), then scaling of student, teacher and TID.
    goal = (256, 4)
    student = record("student", [], *goal)
    teacher = record("teacher", [], *goal)
    floor_time = student["step"] + teacher["step"]
    floor_mem = student["peak_mb"] + teacher["peak_mb"]
    rows = []
    for label in args.methods:
        losses, opts = METHODS[label]
        p = record("distill", losses, *goal, opts=opts, label=label)
        masks = sum(v for k, v in p["breakdown"].items() if k.startswith("masks"))
        rows.append((label, p, p["step"] / floor_time, p["peak_mb"] / floor_mem, masks / p["step"]))
    scaling = {}
    for kind, losses in () if args.no_scaling else (("student", []), ("teacher", []), ("distill", ["TID"])):
        pts = []
        for size in args.sizes:
            for batch in args.batches if size == 256 else [4]:
                p = student if (kind, size, batch) == ("student", *goal) else (
                    teacher if (kind, size, batch) == ("teacher", *goal) else record(kind, losses, size, batch))
                pts.append((batch * size * size, p["step"]))
        scaling[kind] = {"points": pts, "exponent": fitted_exponent(pts)}
    report["scaling"] = scaling
    report["wall_seconds"] = round(time.perf_counter() - start, 1)

    lines = ["# Distillation speed and memory", "", f"Command: `{report['command']}`  ",
             f"Machine: {report['machine']}  ", f"Wall time: {report['wall_seconds'] / 60:.1f} min  ",
             f"Detector: {args.detector}, student R18-FPN, teacher R34-FPN (configs/digits), random weights; "
             f"median of {args.iters} iterations after {args.warmup} warm-up; peak = RSS growth of a fresh "
             "process over its size after imports." + (f" Options on every distillation run: `{' '.join(args.opts)}`."
                                                       if args.opts else ""), "",
             f"At batch 4, 256 px: student step {student['step']:.3f} s (+{student['peak_mb']:.0f} MB), "
             f"teacher inference {teacher['step']:.3f} s (+{teacher['peak_mb']:.0f} MB); floor "
             f"{floor_time:.3f} s, {floor_mem:.0f} MB.", "",
             "| losses | step (s) | / floor | peak (MB) | / floor | masks + losses share | breakdown (s) |",
             "|---|---|---|---|---|---|---|"]
    for label, p, t_ratio, m_ratio, share in rows:
        breakdown = ", ".join(f"{k} {v:.3f}" for k, v in p["breakdown"].items())
        lines.append(f"| {label} | {p['step']:.3f} | {t_ratio:.2f} | {p['peak_mb']:.0f} | "
                     f"{m_ratio:.2f} | {100 * share:.1f} % | {breakdown} |")
    if scaling:
        lines += ["", "Scaling (time against batch x pixels; fitted exponent of a power law):", "",
                  "| run | points (pixels, s) | exponent |", "|---|---|---|"]
    for kind, s in scaling.items():
        pts = "; ".join(f"{px}: {t:.3f}" for px, t in s["points"])
        exponent = "-" if s["exponent"] is None else f"{s['exponent']:.2f}"
        lines.append(f"| {kind} | {pts} | {exponent} |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.output + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
