#!/usr/bin/env python
"""The offline GPU check, in one command (README, "Checking on a GPU").

Run from the project root on a GPU machine without internet, with the folder that
`make gpu-bundle` built here copied beside the project:

    python3 tools/gpu_check.py --bundle gpu_bundle --out OUT            # on the GPU machine
    python tools/gpu_check.py --bundle gpu_bundle --out OUT --device cpu --detectron2 registry

It installs the bundle into a scratch folder (first on PYTHONPATH, nothing else touched),
builds upstream detectron2 with its CUDA ops for the GPU it finds (TORCH_CUDA_ARCH_LIST from the
device's compute capability, ninja) or, if that fails or runs out of its time, installs the
registry's v0.6 Python code, and then runs, each part under its own time limit:
  (a) tests/test_cuda.py;
  (b) tools/bench_speed.py --device cuda --precision fp32 amp at the reference point and at a
      GPU-sized one (batch 16 x 512 px);
  (c) the whole suite with its models on CUDA (D2_TASKDISTILL_TEST_DEVICE=cuda);
  (d) nvidia-smi, versions and each part's wall time (env.json, summary.json, summary.md).
Everything goes to --out, written as each part ends, so a run cut short keeps what it did.

--device cpu runs the same steps on the CPU, shortened (a tiny speed point, two test files), with
a bundle built for the local Python (make gpu-check-cpu, which .ci/run calls). Exit status 0
when every part passed.
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
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seconds per part on the GPU machine; the suite gets what is left of --budget.
LIMITS = {"env": 30, "install": 60, "detectron2 upstream": 240, "detectron2 registry": 90,
          "a: tests/test_cuda.py": 90, "b: speed, reference point": 120, "b: speed, 512 px x 16": 75}
PARTS = ("a", "b", "c")
SUITE_RESERVE = 10  # seconds kept back for the summary
BUNDLED_MODULES = ["yaml", "yacs", "omegaconf", "hydra", "antlr4", "termcolor", "pkg_resources", "wheel",
                   "fvcore", "iopath", "pycocotools"]


class Check:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.bundle = os.path.abspath(args.bundle)
        self.scratch = tempfile.mkdtemp(prefix="d2td_gpu_check_")
        self.site = os.path.join(self.scratch, "site")
        self.started = time.monotonic()
        self.summary = {"command": " ".join(sys.argv), "device": args.device, "parts": {}}

    def remaining(self):
        return self.args.budget - (time.monotonic() - self.started)

    def env(self, **extra):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([self.site, ROOT]), PYTHONUNBUFFERED="1", **extra)
        # No second detectron2 here; the bundle alone says where detectron2 comes from.
        env.pop("D2_TASKDISTILL_OTHER_PYTHON", None)
        env.pop("D2_TASKDISTILL_DETECTRON2_SOURCE", None)
        return env

    def run(self, name, cmd, limit, env=None, log=None):
        """One part: its command under its own time limit (the whole process group is killed
        at the limit); output to its log in --out. Returns True when it exited 0."""
        limit = max(1, min(limit, self.remaining()))
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
                os.killpg(proc.pid, signal.SIGKILL)
                rc, timed_out = proc.wait(), True
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
        self.run("env", self.python(code), LIMITS["env"], log="env.log")
        with open(os.path.join(self.out, "env.log")) as f:
            self.summary["env"] = json.loads(f.read().splitlines()[-1])
        if shutil.which("nvidia-smi"):
            self.run("env: nvidia-smi", ["nvidia-smi"], LIMITS["env"], log="nvidia-smi.txt")

    def install(self):
        wheels = sorted(glob.glob(os.path.join(self.bundle, "wheels", "*.whl")))
        if not wheels:
            sys.exit(f"[gpu_check] no wheels in {self.bundle}/wheels: build the bundle first (make gpu-bundle)")
        ok = self.run("install", [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                                  "--target", self.site, *wheels], LIMITS["install"])
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
                             LIMITS["detectron2 upstream"], env=self.env(**extra))
        if not built and self.args.detectron2 != "upstream":
            self.run("detectron2 registry", [*installer, "--registry-sdist", registry[0]],
                     LIMITS["detectron2 registry"])
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
        pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfE"]
        expect = {"D2_TASKDISTILL_EXPECT_DETECTRON2": kind}
        cuda = self.args.device == "cuda"
        parts = self.args.parts
        if "a" in parts:
            self.run("a: tests/test_cuda.py", [*pytest, "tests/test_cuda.py", "--junitxml",
                                               os.path.join(self.out, "a.xml")],
                     LIMITS["a: tests/test_cuda.py"], env=self.env(**expect))
        bench = [sys.executable, os.path.join(ROOT, "tools", "bench_speed.py"), "--device", self.args.device,
                 "--no-scaling"]
        tmp = {"TMPDIR": self.scratch}
        if cuda:
            points = {"b: speed, reference point": ["--precision", "fp32", "amp", "--rounds", "5", "--iters", "3",
                                                     "--output", os.path.join(self.out, "speed_cuda")],
                      # Two methods at the large point: each kind is a process of its own.
                      "b: speed, 512 px x 16": ["--precision", "fp32", "amp", "--rounds", "3", "--iters", "2",
                                                "--size", "512", "--batch", "16", "--methods", "TID", "BCKD+TID",
                                                "--output", os.path.join(self.out, "speed_cuda_512x16")]}
        else:
            points = {"b: speed, reference point": ["--precision", "fp32", "--rounds", "1", "--iters", "1",
                                                     "--warmup", "0", "--size", "128", "--batch", "1", "--methods",
                                                     "TID", "--output", os.path.join(self.out, "speed_cpu")]}
        for name, opts in points.items() if "b" in parts else ():
            self.run(name, [*bench, *opts], LIMITS[name], env=self.env(**tmp), log=name.split(",")[1].strip()
                     .replace(" ", "_") + ".log")
        suite = ["tests"] if cuda else ["tests/test_compat.py", "tests/test_host_syncs.py"]
        if "c" not in parts:
            return
        self.run("c: suite on " + self.args.device, [*pytest, "--durations=20", *suite, "--junitxml",
                                                     os.path.join(self.out, "suite.xml")],
                 self.remaining() - SUITE_RESERVE, log=f"suite_{self.args.device}.log",
                 env=self.env(D2_TASKDISTILL_TEST_DEVICE=self.args.device, **expect))

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
                 f"Wall time: {self.summary['wall_seconds']:.0f} s", "",
                 "| part | result | seconds | limit | log | last line |", "|---|---|---|---|---|---|"]
        for name, p in self.summary["parts"].items():
            if p.get("skipped"):
                lines.append(f"| {name} | skipped: {p['skipped']} | | | | |")
                continue
            result = "timed out" if p["timed_out"] else ("ok" if p["rc"] == 0 else f"failed (rc {p['rc']})")
            last = p["last_line"].replace("|", "/")[:120]
            lines.append(f"| {name} | {result} | {p['seconds']:.0f} | {p['limit_s']} | {p['log']} | {last} |")
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=os.path.join(ROOT, "gpu_bundle"), help="the folder make gpu-bundle built")
    parser.add_argument("--out", required=True, help="output folder: logs, JSON, the speed tables")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--detectron2", default="auto", choices=["auto", "upstream", "registry"],
                        help="auto: build upstream, the registry's v0.6 if that fails")
    parser.add_argument("--budget", type=float, default=570, help="seconds for the whole check")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS,
                        help="a: test_cuda.py, b: speed tables, c: the suite (e.g. a rerun of c alone)")
    args = parser.parse_args()
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
