#!/usr/bin/env python
"""Distillation overhead: time per iteration of each method against the floor (student
training step + teacher inference), peak memory, the step's breakdown, and scaling.
Writes benchmarks/speed.md and benchmarks/speed.json.

    python tools/bench_speed.py --detectors retinanet faster_rcnn # make bench-speed
    python tools/bench_speed.py --device cuda --precision fp32 amp
    python tools/bench_speed.py --rounds 40 --no-scaling
    python tools/bench_speed.py --methods TBD --no-scaling --opts DISTILL.TBD.LOG_PERIOD 1

Ratios: one process builds the student, the teacher and every method's model, then runs
--rounds rounds; in each round every method's training step is timed right next to a student
step and a teacher inference (order reversed every other round, methods rotated), and the
ratio method / (student + teacher) is taken within that triple. The table gives the median
over rounds and its quartiles: a drift of the machine's speed, which moves single steps by
tens of percent on a shared VM, touches the three steps of a triple alike. Peak memory and
the breakdown of the step come from one process per kind (peak RSS growth on the CPU,
torch.cuda.max_memory_allocated on CUDA). On CUDA every timed region ends with
torch.cuda.synchronize().

Precision "amp" is what SOLVER.AMP.ENABLED and DISTILL.TEACHER.AMP give: float16 autocast
with a grad scaler on CUDA; bfloat16 autocast on the CPU (slow where the CPU lacks bf16 units).
"""
import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# label -> DISTILL.LOSSES
METHODS = {
    "FITNET": ["FITNET"],
    "FGFI": ["FGFI"],
    "TID": ["TID"],
    "TBD": ["TBD"],
    "BCKD": ["BCKD"],
    "BCKD+TID": ["BCKD", "TID"],
    "FGD": ["FGD"],
    "PKD": ["PKD"],
    "CWD": ["CWD"],
    "ROI_KD": ["ROI_KD"],
    "PKD+BCKD+ROI_KD": ["PKD", "BCKD", "ROI_KD"],
}
DETECTORS = ["retinanet", "fcos", "faster_rcnn"]
FLOOR = ("student", "teacher")


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Bench:
    """The models and the synthetic batch of one measurement process."""

    def __init__(self, args):
        import torch

        import d2_taskdistill  # noqa: F401
        from detectron2.structures import Boxes, Instances

        self.torch = torch
        self.args = args
        self.device = torch.device(args.device)
        if self.device.type == "cuda":
            # "cuda" is the current device; "cuda:1" must become it, or synchronize() and the
            # peak-memory counters would look at another GPU than the one that computes.
            self.device = torch.device("cuda", torch.cuda.current_device() if self.device.index is None
                                       else self.device.index)
            torch.cuda.set_device(self.device)
        self.amp = args.precision == "amp"
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        torch.manual_seed(0)
        size = args.size
        gen = torch.Generator().manual_seed(0)
        self.batch = []
        for _ in range(args.batch):
            inst = Instances((size, size))
            xy = torch.rand(4, 2, generator=gen) * size * 0.7
            wh = torch.rand(4, 2, generator=gen) * size * 0.3 + 8
            inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
            inst.gt_classes = torch.randint(0, 10, (4,), generator=gen)
            image = torch.rand(3, size, size, generator=gen) * 255
            self.batch.append({"image": image.to(self.device), "instances": inst.to(self.device)})
        self.gt = [x["instances"] for x in self.batch]

    def opts(self):
        a = self.args
        return ["INPUT.MIN_SIZE_TRAIN", f"({a.size},)", "INPUT.MAX_SIZE_TRAIN", a.size, "MODEL.DEVICE", a.device]

    def config(self, name, opts=()):
        from d2_taskdistill import load_config

        return load_config(os.path.join(ROOT, "configs", "digits", name), [*self.opts(), *opts])

    def teacher_weights(self):
        """Random teacher weights, saved once: speed does not depend on the values."""
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.modeling import build_model

        detector = self.args.detectors[0]
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_speed_{detector}_teacher")
        if not os.path.exists(path + ".pth"):
            teacher = build_model(self.config(f"{detector}_R34_FPN_teacher.yaml"))
            DetectionCheckpointer(teacher, save_dir=os.path.dirname(path)).save(os.path.basename(path))
        return path + ".pth"

    def build(self, kind):
        """A step function for ``kind``: 'student', 'teacher' or a METHODS label."""
        from detectron2.modeling import build_model

        from d2_taskdistill.modeling.dense_outputs import run_dense_detector
        from d2_taskdistill.modeling.rcnn_outputs import is_rcnn, run_rcnn_detector

        torch, detector = self.torch, self.args.detectors[0]
        if kind == "teacher":
            model = build_model(self.config(f"{detector}_R34_FPN_teacher.yaml")).eval()
            # What a distillation runs of its teacher: the backbone and the (RPN) head, no proposals.
            run = (lambda: run_rcnn_detector(model, self.batch, self.gt, with_losses=False)) if is_rcnn(model) else (
                lambda: run_dense_detector(model, self.batch, self.gt))

            @torch.no_grad()
            def step(timed):
                with self.autocast():
                    run()
            return step
        if kind == "student":
            model = build_model(self.config(f"{detector}_R18_FPN_student.yaml"))
        else:
            model = build_model(self.config(
                f"{detector}_R34-R18_fitnet.yaml",
                ["DISTILL.LOSSES", METHODS[kind], "DISTILL.TEACHER.WEIGHTS", self.teacher_weights(),
                 "DISTILL.TEACHER.OPTS", self.opts(), "DISTILL.TEACHER.AMP", self.amp, *self.args.opts]))
        model.train()
        # lr 0: the step costs the same, and random-weight models cannot diverge.
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp and self.device.type == "cuda")

        def forward(timed):
            if timed is None or kind == "student":
                return model(self.batch)
            # The distillation forward in its parts (TaskDistillDetector.forward, timed); an
            # R-CNN student's own losses are computed in its forward.
            sizes = model.image_sizes_on_device(self.batch)
            teacher = timed("teacher forward", lambda: model.run_teacher(self.batch, self.gt, sizes))
            student = timed("student forward", lambda: model.run_detector(model.student, self.batch, self.gt, sizes))
            with torch.autocast(self.device.type, enabled=False):
                student.to_float32()
                losses = timed("student losses", lambda: dict(student.detector_losses()))
                student_levels, teacher_levels = model.paired_levels(student, teacher)
                for name, module in model.distill_losses.items():
                    losses.update(timed(f"masks + loss {name}", lambda: module(student_levels, teacher_levels)))
            return losses

        def step(timed):
            with self.autocast():
                total = sum(forward(timed).values())
            optimizer.zero_grad()

            def backward():
                scaler.scale(total).backward()
                scaler.step(optimizer)
                scaler.update()
            (timed or (lambda name, fn: fn()))("backward + step", backward)
        return step

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.amp_dtype)

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def clock(self, fn):
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - start


def child_rounds(args):
    """Interleaved rounds in one process. In each round every method's step is timed next to
    a student step and a teacher step (order reversed every other round), so that each ratio
    compares steps a few seconds apart. Returns {"ratios": {method: [...]}, "steps": {kind: [...]}}."""
    bench = Bench(args)
    kinds = [*FLOOR, *args.methods]
    steps = {kind: bench.build(kind) for kind in kinds}
    from detectron2.utils.events import EventStorage

    ratios = {kind: [] for kind in args.methods}
    times = {kind: [] for kind in kinds}
    with EventStorage(0):
        for kind in kinds:
            for _ in range(args.warmup):
                steps[kind](None)
        for r in range(args.rounds):
            shift = r % len(args.methods)
            for method in args.methods[shift:] + args.methods[:shift]:
                order = [*FLOOR, method] if r % 2 == 0 else [method, *reversed(FLOOR)]
                seconds = {kind: bench.clock(lambda: steps[kind](None))[1] for kind in order}
                ratios[method].append(seconds[method] / (seconds["student"] + seconds["teacher"]))
                for kind, t in seconds.items():
                    times[kind].append(t)
    return {"ratios": ratios, "steps": times}


def child_profiles(args):
    """Every kind's profile in this one process, one kind after the other (CUDA only: its peak
    counter is reset per kind, and each kind's models are freed before the next is built)."""
    import gc

    torch_mod = __import__("torch")
    profiles = {}
    for kind in [*FLOOR, *args.methods]:
        profiles[kind] = child_profile(args, kind)
        gc.collect()
        torch_mod.cuda.empty_cache()
    return profiles


def child_profile(args, kind):
    """One kind: median step, its breakdown, and peak memory (alone in its process on the CPU,
    where the peak RSS cannot be reset)."""
    torch_mod = __import__("torch")
    base_rss = rss_mb()
    cuda = args.device.startswith("cuda")
    # What earlier kinds of this process left allocated (0 in a fresh process).
    base_allocated = torch_mod.cuda.memory_allocated(torch_mod.device(args.device)) if cuda else 0
    bench = Bench(args)
    step = bench.build(kind)
    from detectron2.utils.events import EventStorage

    if bench.device.type == "cuda":
        torch_mod.cuda.reset_peak_memory_stats(bench.device)
    parts = {}

    def timed(name, fn):
        out, seconds = bench.clock(fn)
        parts.setdefault(name, []).append(seconds)
        return out

    steps = []
    with EventStorage(0):
        for i in range(args.warmup + args.iters):
            if i == args.warmup:
                parts.clear()
            seconds = bench.clock(lambda: step(timed))[1]
            if i >= args.warmup:
                steps.append(seconds)
    if bench.device.type == "cuda":
        peak = (torch_mod.cuda.max_memory_allocated(bench.device) - base_allocated) / 2**20
    else:
        peak = peak_rss_mb() - base_rss
    return {"step": statistics.median(steps), "breakdown": {k: statistics.median(v) for k, v in parts.items()},
            "peak_mb": peak}


def run_child(args, mode, kind="-", size=None, batch=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--kind", kind,
           "--size", str(size or args.size), "--batch", str(batch or args.batch),
           "--iters", str(args.iters), "--warmup", str(args.warmup), "--rounds", str(args.rounds),
           "--detectors", args.detectors[0], "--device", args.device, "--precision", args.precision,
           *(["--threads", str(args.threads)] if args.threads else []),
           "--methods", *args.methods, "--opts", *args.opts]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measurement {mode} {kind} ({' '.join(cmd)}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fitted_exponent(points):
    """Slope of log(time) against log(pixels); None with fewer than two pixel counts."""
    import numpy as np

    x, y = zip(*points)
    if len(set(x)) < 2:
        return None
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def ratio_summary(ratios):
    """Median of the per-round ratios, their quartiles and range."""
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "min": min(ratios), "max": max(ratios),
            "per_round": ratios}


def measure_precision(args, precision, log):
    """Rounds and per-kind profiles at the reference point for one precision."""
    args = argparse.Namespace(**{**vars(args), "precision": precision})
    rounds = run_child(args, "rounds")
    if args.device.startswith("cuda"):
        profiles = run_child(args, "profiles")  # one process: each start of CUDA costs seconds
    else:
        profiles = {kind: run_child(args, "profile", kind) for kind in [*FLOOR, *args.methods]}
    steps = {kind: statistics.median(v) for kind, v in rounds["steps"].items()}
    floor_mem = profiles["student"]["peak_mb"] + profiles["teacher"]["peak_mb"]
    result = {"steps": rounds["steps"], "profiles": profiles, "methods": {}}
    log(f"[speed] {precision}: floor {steps['student'] + steps['teacher']:.4f} s (student {steps['student']:.4f} + "
        f"teacher {steps['teacher']:.4f}), {floor_mem:.0f} MB")
    for kind in args.methods:
        ratio = ratio_summary(rounds["ratios"][kind])
        prof = profiles[kind]
        masks = sum(v for k, v in prof["breakdown"].items() if k.startswith("masks"))
        result["methods"][kind] = {
            "step": steps[kind], "ratio": ratio, "peak_mb": prof["peak_mb"],
            "memory_ratio": prof["peak_mb"] / floor_mem, "masks_share": masks / prof["step"],
            "breakdown": prof["breakdown"]}
        log(f"[speed] {precision} {kind:9s} {steps[kind]:.4f} s, x{ratio['median']:.3f} "
            f"[{ratio['q1']:.3f}-{ratio['q3']:.3f}], {prof['peak_mb']:.0f} MB")
    return result


def methods_for(detector, asked=None):
    """``asked`` (default: every METHODS label) that run between two of ``detector``'s kind."""
    from d2_taskdistill.modeling.meta_arch import losses_between

    allowed = set(losses_between(two_stage=detector == "faster_rcnn"))
    return [label for label in asked or METHODS if set(METHODS[label]) <= allowed]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", default=["retinanet"], choices=DETECTORS,
                        help="student R18 / teacher R34 pairs of configs/digits, measured one after the other")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "amp"])
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (one ratio per method each)")
    parser.add_argument("--iters", type=int, default=5, help="timed steps of each kind's profile")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--size", type=int, default=256, help="reference point: image size (px)")
    parser.add_argument("--batch", type=int, default=4, help="reference point: images per batch")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                        help="default: every method that runs between two detectors of each kind")
    parser.add_argument("--no-scaling", action="store_true", help="skip the batch / size sweep (first detector)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config options added to every distillation run, e.g. DISTILL.TBD.LOG_PERIOD 1")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "speed"))
    parser.add_argument("--child", choices=["rounds", "profile", "profiles"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        args.precision = args.precision[0]
        out = {"rounds": child_rounds, "profiles": child_profiles}.get(
            args.child, lambda a: child_profile(a, a.kind))(args)
        print(json.dumps(out))
        return 0
    per_detector = {det: methods_for(det, args.methods) for det in args.detectors}
    for det, methods in per_detector.items():
        refused = sorted(set(args.methods or ()) - set(methods))
        if refused:
            parser.error(f"--methods {' '.join(refused)}: they do not run between two {det} detectors; "
                         f"its methods are {' '.join(methods_for(det))}")

    start = time.perf_counter()
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else (
        f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    report = {"command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
              "device": device_name, "torch": torch.__version__,
              "reference": {"size": args.size, "batch": args.batch}, "rounds": args.rounds,
              "iters": args.iters, "detectors": {}, "scaling": {}}
    log = lambda line: print(line, flush=True)
    for det, methods in per_detector.items():
        det_args = argparse.Namespace(**{**vars(args), "detectors": [det], "methods": methods})
        report["detectors"][det] = {"precision": {}}
        for precision in args.precision:
            log(f"[speed] {det}")
            report["detectors"][det]["precision"][precision] = measure_precision(det_args, precision, log)
            # Written as each precision ends: a run cut short keeps the table it has.
            report["wall_seconds"] = round(time.perf_counter() - start, 1)
            write_report(args, report)

    first = argparse.Namespace(**{**vars(args), "detectors": args.detectors[:1], "precision": "fp32",
                                  "methods": per_detector[args.detectors[0]]})
    scaled = "TID" if "TID" in first.methods else first.methods[-1]
    scaling = {}
    for kind in () if args.no_scaling else ("student", "teacher", scaled):
        pts = []
        for size in args.sizes:
            for batch in args.batches if size == args.size else [args.batch]:
                p = run_child(first, "profile", kind, size, batch)
                log(f"[speed] scaling {kind:8s} {size:4d}px x{batch}: {p['step']:.3f} s")
                pts.append((batch * size * size, p["step"]))
        scaling[kind] = {"points": pts, "exponent": fitted_exponent(pts)}
    report["scaling"] = scaling
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_report(args, report)
    return 0


def write_report(args, report):
    from harness.report import markdown_table, write_report_files

    unit = "allocated (torch.cuda.max_memory_allocated)" if args.device.startswith("cuda") else "RSS growth"
    lines = ["# Distillation speed and memory", "", f"Command: `{report['command']}`  ",
             f"Device: {report['device']}, torch {report['torch']}  ",
             f"Wall time: {report['wall_seconds'] / 60:.1f} min  ",
             f"Each detector: student R18-FPN, teacher R34-FPN (configs/digits), random weights, "
             f"batch {args.batch} x {args.size} px. Ratio = method step / (student step + teacher inference), "
             f"the three steps timed one after the other; median over {args.rounds} interleaved rounds "
             f"[quartiles] (range). Step times: medians over the rounds. Peak memory and breakdown: "
             f"{'one process per precision' if args.device.startswith('cuda') else 'one process per kind'} "
             f"({args.iters} steps), peak {unit}. An R-CNN teacher's inference is its backbone and RPN head; "
             f"its student's own losses are computed in its forward."
             + (f" Options on every distillation run: `{' '.join(args.opts)}`." if args.opts else ""), ""]
    for det, measured in report["detectors"].items():
        for precision, res in measured["precision"].items():
            steps, prof = res["steps"], res["profiles"]
            floor_mem = prof["student"]["peak_mb"] + prof["teacher"]["peak_mb"]
            lines += [f"## {det}, {precision}", "",
                      f"Floor: student step {statistics.median(steps['student']):.4f} s "
                      f"({prof['student']['peak_mb']:.0f} MB), teacher inference "
                      f"{statistics.median(steps['teacher']):.4f} s ({prof['teacher']['peak_mb']:.0f} MB); "
                      f"{floor_mem:.0f} MB together.", ""]
            rows = []
            for kind, m in res["methods"].items():
                r = m["ratio"]
                rows.append([kind, f"{m['step']:.4f}",
                             f"{r['median']:.3f} [{r['q1']:.3f}-{r['q3']:.3f}] ({r['min']:.3f}-{r['max']:.3f})",
                             f"{m['peak_mb']:.0f}", f"{m['memory_ratio']:.2f}", f"{100 * m['masks_share']:.1f} %",
                             ", ".join(f"{k} {v:.4f}" for k, v in m["breakdown"].items())])
            lines += [markdown_table(["losses", "step (s)", "/ floor: median [quartiles] (range)", "peak (MB)",
                                      "/ floor", "masks + losses share", "breakdown (s)"], rows), ""]
    if report["scaling"]:
        rows = [[kind, "; ".join(f"{px}: {t:.3f}" for px, t in s["points"]),
                 "-" if s["exponent"] is None else f"{s['exponent']:.2f}"] for kind, s in report["scaling"].items()]
        lines += [f"Scaling, {args.detectors[0]}, fp32 (time against batch x pixels; fitted exponent of a power law):",
                  "", markdown_table(["run", "points (pixels, s)", "exponent"], rows)]
    write_report_files(args.output, report, lines)


if __name__ == "__main__":
    sys.exit(main())
