#!/usr/bin/env python
"""The offline GPU check, in one command (docs/development.md, "Checking on a GPU").

Run from the project root on a GPU machine without internet, with the folder that
`make gpu-bundle` built here copied beside the project:

    python3 tools/gpu_check.py --bundle gpu_bundle --out OUT            # on the GPU machine
    python tools/gpu_check.py --bundle gpu_bundle --out OUT --device cpu --detectron2 registry

It installs the bundle into a scratch folder (first on PYTHONPATH, nothing else touched),
builds upstream detectron2 with its CUDA ops for the GPU it finds (TORCH_CUDA_ARCH_LIST from the
device's compute capability, ninja) or, if that fails or runs out of its time, installs the
registry's v0.6 Python code, and then runs, each part under its own time limit (LIMITS; at the
limit SIGINT, so that pytest writes its junit and summary, then SIGKILL), in the order that
tells the most if the time runs out:
  (a) tests/test_cuda.py: one AMP training per detector and the CUDA unit tests;
  (b) tools/bench_speed.py --device cuda --precision fp32 amp at the reference point and at a
      GPU-sized one (batch 16 x 512 px), the tables written after each precision;
  (c) the whole suite with its models on CUDA (D2_TASKDISTILL_TEST_DEVICE=cuda), on every core
      (pytest-xdist), each test bounded (pytest-timeout), the device-heavy files first;
  (d) nvidia-smi, versions and each part's wall time (env.json, summary.json, summary.md).
Everything goes to --out, written as each part ends, so a run cut short keeps what it did.

--device cpu runs the same steps on the CPU with a tiny speed point: it is what the GPU
machine's twin runs (make gpu-twin, tools/gpu_twin.py). Exit status 0 when every part passed.
"""
import argparse
import glob
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seconds for each step, per --device. The fixed limits, the suite's minimum and the reserve add
# up to at most the budget (tests/test_gpu_check.py), so that every part gets its time whatever
# the parts before it do: the registry's v0.6 is counted although it runs only where upstream's
# build fails. "cuda": the GPU machine (16 cores, one run of at most 600 s, 15 min of device time
# with its start); "cpu": the twin of it on 2 cores (make gpu-twin), where the upstream build
# takes about 6 min and the suite about 12.
LIMITS = {
    "cuda": {"budget": 570, "env": 15, "nvidia-smi": 10, "install": 30, "detectron2 upstream": 180,
             "detectron2 registry": 30, "a: tests/test_cuda.py": 60, "b: speed, reference point": 75,
             "b: speed, 512 px x 16": 40, "c: suite minimum": 100},
    "cpu": {"budget": 2700, "env": 30, "nvidia-smi": 10, "install": 90, "detectron2 upstream": 720,
            "detectron2 registry": 120, "a: tests/test_cuda.py": 60, "b: speed, reference point": 150,
            "c: suite minimum": 1200},
}
GRACE = 15  # seconds between SIGINT (pytest writes its junit and summary) and SIGKILL
RESERVE = 20  # the grace of the last part, the probes between parts and the summary
PARTS = ("a", "b", "c")
# Part c runs these first, so that a cut leaves the tests that touch the device done.
SUITE_FIRST = ["tests/test_mixed_precision.py", "tests/test_host_syncs.py", "tests/test_distill_detector.py",
               "tests/test_detectors.py", "tests/test_lazy_configs.py", "tests/test_checkpoints.py",
               "tests/test_launch.py"]
PER_TEST_TIMEOUT = {"cuda": 240, "cpu": 600}  # pytest-timeout, seconds
BUNDLED_MODULES = ["yaml", "yacs", "omegaconf", "hydra", "antlr4", "termcolor", "pkg_resources", "wheel",
                   "fvcore", "iopath", "pycocotools", "pycocotools._mask"]


def suite_files():
    """The suite's files, SUITE_FIRST first (pytest collects files in the order given; a folder
    argument would be collected in its own order). test_cross_version.py needs the other
    detectron2's venv, which the check does not have."""
    rest = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
    return [*SUITE_FIRST, *(p for p in rest if p not in SUITE_FIRST and p != "tests/test_cross_version.py")]


def fixed_seconds(device):
    """Seconds the budget must hold besides the suite: every fixed limit and the reserve."""
    limits = LIMITS[device]
    return sum(v for k, v in limits.items() if k not in ("budget", "c: suite minimum")) + RESERVE


def check_budget(device, budget):
    """None when ``budget`` holds every part of ``device``'s check, else what is missing."""
    need = fixed_seconds(device) + LIMITS[device]["c: suite minimum"]
    if budget < need:
        return (f"--budget {budget:.0f} s is too little for --device {device}: the parts' limits, the suite's "
                f"minimum and the reserve need {need} s (tools/gpu_check.py LIMITS)")
    return None


def stop(proc, grace=GRACE):
    """SIGINT to the process group (pytest then writes its junit and summary), SIGKILL after grace."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def pytest_parallel_args(device, workers):
    """pytest-xdist and pytest-timeout options where they are installed (the GPU machine and the
    twin have both); the suite runs serially and unbounded per test without them."""
    import importlib.util

    args = []
    if importlib.util.find_spec("xdist") and workers > 1:
        args += ["-n", str(workers)]
    if importlib.util.find_spec("pytest_timeout"):
        args += ["--timeout", str(PER_TEST_TIMEOUT[device])]
    return args


class Check:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.bundle = os.path.abspath(args.bundle)
        self.scratch = tempfile.mkdtemp(prefix="d2td_gpu_check_")
        self.site = os.path.join(self.scratch, "site")
        self.started = time.monotonic()
        self.limits = LIMITS[args.device]
        self.summary = {"command": " ".join(sys.argv), "device": args.device, "budget_s": args.budget,
                        "parts": {}}

    def remaining(self):
        return self.args.budget - (time.monotonic() - self.started)

    def env(self, **extra):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([self.site, ROOT]), PYTHONUNBUFFERED="1",
                   # The GPU machine reaches no network: no pip call may try.
                   PIP_NO_INDEX="1", **extra)
        # No second detectron2 here; the bundle alone says where detectron2 comes from.
        env.pop("D2_TASKDISTILL_OTHER_PYTHON", None)
        env.pop("D2_TASKDISTILL_DETECTRON2_SOURCE", None)
        return env

    def run(self, name, cmd, limit, env=None, log=None):
        """One part: its command under its own time limit (then SIGINT to its process group,
        SIGKILL after a grace); output to its log in --out. Returns True when it exited 0."""
        limit = max(1, min(limit, self.remaining() - RESERVE))
        log = log or name.split(":")[0].replace(" ", "_").replace("/", "_") + ".log"
        path = os.path.join(self.out, log)
        started = time.monotonic()
        with open(path, "w") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env(), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc, timed_out = proc.wait(timeout=limit), False
            except subprocess.TimeoutExpired:
                rc, timed_out = stop(proc), True
        seconds = round(time.monotonic() - started, 1)
        with open(path) as f:
            tail = [line.rstrip() for line in f.readlines()[-3:]]
        self.summary["parts"][name] = {"rc": rc, "timed_out": timed_out, "seconds": seconds,
                                       "limit_s": round(limit), "log": log, "last_line": tail[-1] if tail else ""}
        status = "TIMED OUT" if timed_out else ("ok" if rc == 0 else f"FAILED rc={rc}")
        print(f"[gpu_check] {name}: {status} in {seconds:.0f} s (limit {limit:.0f} s): {log}", flush=True)
        self.write_summary()
        return rc == 0 and not timed_out

    def python(self, code):
        return [sys.executable, "-c", code]

    # --- steps ----------------------------------------------------------------------------
    def environment(self):
        code = ("import json, os, sys, torch; print(json.dumps({'python': sys.version.split()[0], "
                "'torch': torch.__version__, 'cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available(), "
                "'gpus': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "
                "'capability': torch.cuda.get_device_capability() if torch.cuda.is_available() else None, "
                "'cpus': os.cpu_count()}))")
        self.run("env", self.python(code), self.limits["env"], log="env.log")
        with open(os.path.join(self.out, "env.log")) as f:
            self.summary["env"] = json.loads(f.read().splitlines()[-1])
        if shutil.which("nvidia-smi"):
            self.run("env: nvidia-smi", ["nvidia-smi"], self.limits["nvidia-smi"], log="nvidia-smi.txt")

    def install(self):
        wheels = sorted(glob.glob(os.path.join(self.bundle, "wheels", "*.whl")))
        if not wheels:
            sys.exit(f"[gpu_check] no wheels in {self.bundle}/wheels: build the bundle first (make gpu-bundle)")
        ok = self.run("install", [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                                  "--target", self.site, *wheels], self.limits["install"])
        # Each bundled module must come from the scratch folder, not from the machine.
        code = ("import importlib, json; print(json.dumps({m: importlib.import_module(m).__file__ "
                f"for m in {BUNDLED_MODULES!r}}}))")
        found = subprocess.run(self.python(code), cwd=ROOT, env=self.env(), capture_output=True, text=True)
        files = json.loads(found.stdout) if found.returncode == 0 else {}
        outside = sorted(m for m in BUNDLED_MODULES if not files.get(m, "").startswith(self.site))
        self.summary["bundle_modules_outside_scratch"] = outside if found.returncode == 0 else found.stderr[-2000:]
        return ok and found.returncode == 0 and not outside

    def detectron2(self):
        """Upstream with its ops built here, else the registry's v0.6; returns the kind that runs."""
        installer = [sys.executable, os.path.join(ROOT, "tools", "install_detectron2.py"), "--target", self.site]
        upstream = glob.glob(os.path.join(self.bundle, "detectron2", "detectron2-upstream*"))
        registry = glob.glob(os.path.join(self.bundle, "detectron2", "pb1-detectron2-*"))
        built = False
        if self.args.detectron2 in ("auto", "upstream") and upstream:
            extra = {"MAX_JOBS": str(os.cpu_count() or 1)}
            capability = self.summary.get("env", {}).get("capability")
            if self.args.device == "cuda" and capability:
                extra.update(TORCH_CUDA_ARCH_LIST="{}.{}".format(*capability), FORCE_CUDA="1")
            built = self.run("detectron2 upstream", [*installer, "--source", upstream[0]],
                             self.limits["detectron2 upstream"], env=self.env(**extra))
        if not built and self.args.detectron2 != "upstream":
            self.run("detectron2 registry", [*installer, "--registry-sdist", registry[0]],
                     self.limits["detectron2 registry"])
        code = ("import json, detectron2, d2_taskdistill; from d2_taskdistill import compat; "
                "cuda = compat.HAS_CPP_OPS and detectron2._C.has_cuda(); "
                "print(json.dumps({'file': detectron2.__file__, 'cpp_ops': bool(compat.HAS_CPP_OPS), 'cuda_ops': bool(cuda)}))")
        probe = subprocess.run(self.python(code), cwd=ROOT, env=self.env(), capture_output=True, text=True)
        if probe.returncode != 0:
            self.summary["detectron2"] = {"kind": None, "error": probe.stderr[-3000:]}
            return None
        info = json.loads(probe.stdout.splitlines()[-1])
        info["kind"] = "upstream" if info["cpp_ops"] else "registry-v0.6"
        info["from_scratch"] = info["file"].startswith(self.site)
        self.summary["detectron2"] = info
        print(f"[gpu_check] detectron2 that runs: {info}", flush=True)
        return info["kind"] if info["from_scratch"] else None

    def tests_and_bench(self, kind):
        """a (the CUDA tests), b (the speed table), c (the suite): the order that tells the most
        if the time runs out."""
        pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfE"]
        expect = {"D2_TASKDISTILL_EXPECT_DETECTRON2": kind}
        cuda = self.args.device == "cuda"
        parts = self.args.parts
        if "a" in parts:
            # One AMP training per detector and the unit tests; every method's AMP run is in c.
            self.run("a: tests/test_cuda.py", [*pytest, "tests/test_cuda.py", "-k", "not every_method",
                                               "--junitxml", os.path.join(self.out, "a.xml")],
                     self.limits["a: tests/test_cuda.py"], env=self.env(**expect))
        bench = [sys.executable, os.path.join(ROOT, "tools", "bench_speed.py"), "--device", self.args.device,
                 "--no-scaling"]
        if cuda:
            points = {"b: speed, reference point": ["--precision", "fp32", "amp", "--rounds", "5", "--iters", "3",
                                                     "--output", os.path.join(self.out, "speed_cuda")],
                      "b: speed, 512 px x 16": ["--precision", "fp32", "amp", "--rounds", "3", "--iters", "2",
                                                "--size", "512", "--batch", "16", "--methods", "TID", "BCKD+TID",
                                                "--output", os.path.join(self.out, "speed_cuda_512x16")]}
        else:
            points = {"b: speed, reference point": ["--precision", "fp32", "amp", "--rounds", "1", "--iters", "1",
                                                     "--warmup", "0", "--size", "128", "--batch", "1", "--methods",
                                                     "TID", "--output", os.path.join(self.out, "speed_cpu")]}
        for name, opts in points.items() if "b" in parts else ():
            self.run(name, [*bench, *opts], self.limits[name], env=self.env(TMPDIR=self.scratch),
                     log=name.split(",")[1].strip().replace(" ", "_") + ".log")
        if "c" not in parts:
            return
        # Part a ran tests/test_cuda.py but its every-method sweep: c runs that, not the rest again.
        paths = self.args.suite or suite_files()
        skip_a = ["-k", "not test_cuda or every_method"] if "a" in parts else []
        workers = self.args.workers or (os.cpu_count() or 1)
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        self.run("c: suite on " + self.args.device,
                 [*pytest, "--durations=20", *pytest_parallel_args(self.args.device, workers),
                  *(skip_a if not self.args.suite else []), *paths,
                  "--junitxml", os.path.join(self.out, "suite.xml")],
                 self.remaining(), log=f"suite_{self.args.device}.log",
                 env=self.env(D2_TASKDISTILL_TEST_DEVICE=self.args.device, D2_TASKDISTILL_TEST_THREADS=threads,
                              **expect))

    def write_summary(self):
        self.summary["wall_seconds"] = round(time.monotonic() - self.started, 1)
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(self.summary, f, indent=1)
        env, d2 = self.summary.get("env", {}), self.summary.get("detectron2", {})
        lines = ["# GPU check" if self.args.device == "cuda" else "# GPU check, CPU mode", "",
                 f"Command: `{self.summary['command']}`  ",
                 f"Machine: {', '.join(env.get('gpus') or []) or platform.machine() + ' CPU'}, "
                 f"{env.get('cpus')} cores; Python {env.get('python')}, torch {env.get('torch')}, "
                 f"CUDA {env.get('cuda')}  ",
                 f"detectron2 that ran: {d2.get('kind')} (C++ ops {d2.get('cpp_ops')}, CUDA ops {d2.get('cuda_ops')})  ",
                 f"Wall time: {self.summary['wall_seconds']:.0f} s", ""]
        rows = []
        for name, p in self.summary["parts"].items():
            if p.get("skipped"):
                rows.append([name, f"skipped: {p['skipped']}", "", "", "", ""])
                continue
            result = "timed out" if p["timed_out"] else ("ok" if p["rc"] == 0 else f"failed (rc {p['rc']})")
            rows.append([name, result, f"{p['seconds']:.0f}", p["limit_s"], p["log"],
                         p["last_line"].replace("|", "/")[:120]])
        from tabulate import tabulate  # on the GPU machine (tools/gpu_machine.txt)

        lines.append(tabulate(rows, headers=["part", "result", "seconds", "limit", "log", "last line"],
                              tablefmt="pipe", disable_numparse=True))
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        if self.args.pack:
            self.pack()

    def pack(self):
        """--out in one archive, and summary.md beside it: the device tool brings back only a
        few files from its output folder. Rewritten after each part, so a cut run keeps its last."""
        os.makedirs(self.args.pack, exist_ok=True)
        archive = os.path.join(self.args.pack, "gpu_check.tar.gz")
        with tarfile.open(archive + ".tmp", "w:gz") as tar:
            tar.add(self.out, arcname="gpu_check")
        os.replace(archive + ".tmp", archive)
        shutil.copy(os.path.join(self.out, "summary.md"), os.path.join(self.args.pack, "summary.md"))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=os.path.join(ROOT, "gpu_bundle"), help="the folder make gpu-bundle built")
    parser.add_argument("--out", required=True, help="output folder: logs, JSON, the speed tables")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--detectron2", default="auto", choices=["auto", "upstream", "registry"],
                        help="auto: build upstream, the registry's v0.6 if that fails")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole check (default: LIMITS[device]['budget'], 570 on cuda)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="a: test_cuda.py, b: speed tables, c: the suite (e.g. a rerun of c alone)")
    parser.add_argument("--suite", nargs="+", help="test paths for part c (default: the whole suite)")
    parser.add_argument("--pack", help="also write --out as DIR/gpu_check.tar.gz and DIR/summary.md after each part "
                                       "(for the device tool, which brings back at most 8 files: --pack $OUT)")
    parser.add_argument("--workers", type=int, default=None,
                        help="pytest-xdist workers for part c (default: one per core)")
    return parser


def main():
    parser = build_parser()
    args = parser.parse_args()
    args.budget = LIMITS[args.device]["budget"] if args.budget is None else args.budget
    problem = check_budget(args.device, args.budget)
    if problem:
        parser.error(problem)
    if not os.path.isdir(args.bundle):
        sys.exit(f"[gpu_check] --bundle {args.bundle}: no such folder; build it with make gpu-bundle and copy it "
                 "beside the project")
    check = Check(args)
    kind = None
    print(f"[gpu_check] scratch {check.scratch}, output {check.out}", flush=True)
    try:
        check.environment()
        if args.device == "cuda" and not check.summary["env"]["cuda_available"]:
            sys.exit("[gpu_check] --device cuda: torch sees no GPU here; --device cpu runs the CPU mode")
        ok = check.install()
        kind = check.detectron2() if ok else None
        if kind:
            check.tests_and_bench(kind)
        check.write_summary()
    finally:
        shutil.rmtree(check.scratch, ignore_errors=True)
    # A failed upstream build that the registry's v0.6 replaced shows in the table, as a fallback.
    parts = [p for name, p in check.summary["parts"].items()
             if not (name == "detectron2 upstream" and kind == "registry-v0.6" and args.detectron2 == "auto")]
    passed = kind is not None and all(p.get("skipped") or (p["rc"] == 0 and not p["timed_out"]) for p in parts)
    print(f"[gpu_check] {'passed' if passed else 'FAILED'}: {os.path.join(check.out, 'summary.md')}", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
