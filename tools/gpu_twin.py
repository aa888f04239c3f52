#!/usr/bin/env python
"""The GPU machine's twin, on this machine's CPU (make gpu-twin; docs/development.md, "Checking on a GPU").

    python tools/gpu_twin.py --bundle gpu_bundle --out output/gpu_twin [--detectron2 upstream registry]

1. A Python 3.12 venv (.venv-gpu-twin) holding what the GPU machine holds, at its versions where
   the registry serves them (tools/gpu_twin_requirements.txt), and nothing of the bundle: a check
   that forgets to bring a module, or a subprocess that drops the scratch folder from PYTHONPATH,
   fails here as it would there. A guard in its site-packages refuses and records every
   connection but loopback, in every Python process of the venv whatever its PYTHONPATH
   (tools/twin_network_guard.py).
2. The whole check, tools/gpu_check.py --device cpu (every part; part c the complete suite), once
   for each detectron2 asked, offline: pip with no index and no config files, no proxy. A run
   fails when the check fails or when anything tried the network.
3. Two probes that must fail, so that the twin is known to catch what it is for: a test whose
   subprocess replaces PYTHONPATH, and a test that swallows the error of a network call.

Results: OUT/<detectron2>/ (the check's summary.md, logs, junit) and OUT/twin.json.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
sys.path.insert(0, TOOLS)
from gpu_bundle import find_python  # noqa: E402
from gpu_check import BUNDLED_MODULES  # noqa: E402

REQUIREMENTS = os.path.join(TOOLS, "gpu_twin_requirements.txt")
GUARD = os.path.join(TOOLS, "twin_network_guard.py")
PYTHON_VERSION = "3.12"  # the GPU machine's
# Measured on a fresh twin venv: its size, and the disk its install used at its peak.
TWIN_VENV_GB, TWIN_INSTALL_PEAK_GB = 5.3, 7.3
NETWORK_LOG = "network_attempts.log"
PROXY_VARS = ["http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"]


def log(message):
    print(f"[gpu_twin] {message}", flush=True)


def venv_python(venv):
    return os.path.join(venv, "bin", "python")


def fingerprint():
    digest = hashlib.sha256()
    for path in (REQUIREMENTS, GUARD):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def site_packages(venv):
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return subprocess.run([venv_python(venv), "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def build_venv(venv):
    """The twin's venv, rebuilt from nothing when its requirements or guard changed."""
    stamp = os.path.join(venv, ".twin-complete")
    if os.path.exists(stamp) and open(stamp).read() == fingerprint():
        log(f"{venv}: up to date")
        return
    python = find_python(PYTHON_VERSION)
    if python is None:
        sys.exit(f"[gpu_twin] no python{PYTHON_VERSION} on this machine (PATH or ~/.pyenv/versions): the twin "
                 f"needs the GPU machine's Python; install one (e.g. pyenv install {PYTHON_VERSION})")
    shutil.rmtree(venv, ignore_errors=True)
    started = time.monotonic()
    subprocess.run([python, "-m", "venv", venv], check=True)
    # No pip cache: disk is what runs short on CI, and nothing installs from a cached copy again.
    installed = subprocess.run([venv_python(venv), "-m", "pip", "install", "-q", "--no-cache-dir",
                                "-r", REQUIREMENTS])
    if installed.returncode != 0:
        sys.exit(f"[gpu_twin] pip could not install {REQUIREMENTS} into {venv} (pip's message above). "
                 f"{free_space(venv)} The venv takes about {TWIN_VENV_GB} GB (torch with its CUDA wheels) and "
                 f"pip's downloads about {TWIN_INSTALL_PEAK_GB - TWIN_VENV_GB:.0f} GB more while it installs: on "
                 f"'No space left on device', free that much and run it again")
    # Last, so that the installs above may use the registry: from here on no process may.
    site = site_packages(venv)
    shutil.copy(GUARD, os.path.join(site, "d2td_twin_network_guard.py"))
    with open(os.path.join(site, "d2td_twin_network_guard.pth"), "w") as f:
        f.write(f"import d2td_twin_network_guard; d2td_twin_network_guard.install({network_log(venv)!r})\n")
    with open(stamp, "w") as f:
        f.write(fingerprint())
    log(f"{venv}: built in {time.monotonic() - started:.0f} s. {free_space(venv)}")


def free_space(path):
    usage = shutil.disk_usage(os.path.dirname(os.path.abspath(path)))
    return f"Free on its disk now: {usage.free / 2**30:.1f} GB."


def network_log(venv):
    return os.path.join(os.path.abspath(venv), NETWORK_LOG)


def twin_env(venv):
    """Offline, as on the GPU machine: pip with no index and no config (this machine's config
    names local indexes the GPU machine lacks), no proxy, nothing of the project's own venvs."""
    env = {k: v for k, v in os.environ.items()
           if k not in PROXY_VARS and not k.startswith(("PIP_", "D2_TASKDISTILL_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1",
               PATH=os.pathsep.join([os.path.join(os.path.abspath(venv), "bin"), env.get("PATH", "")]))
    return env


def bundle_modules_present(venv):
    """Bundle modules the twin can import by itself: none may be there (but setuptools' and
    wheel's, which the GPU machine has too; the bundle brings its own for building detectron2)."""
    modules = ["detectron2", *(m for m in BUNDLED_MODULES if m not in ("wheel", "pkg_resources"))]
    code = ("import importlib.util, json, sys; "
            f"print(json.dumps([m for m in {modules!r} "
            "if importlib.util.find_spec(m.split('.')[0])]))")
    out = subprocess.run([venv_python(venv), "-c", code], env=twin_env(venv), capture_output=True, text=True,
                         check=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_check(venv, bundle, out, detectron2, extra=()):
    """tools/gpu_check.py in the twin; returns (check's exit status, network attempts)."""
    attempts_path = network_log(venv)
    if os.path.exists(attempts_path):
        os.remove(attempts_path)
    cmd = [venv_python(venv), os.path.join(TOOLS, "gpu_check.py"), "--bundle", bundle, "--out", out,
           "--device", "cpu", "--detectron2", detectron2, *extra]
    log("$ " + " ".join(cmd))
    rc = subprocess.run(cmd, cwd=ROOT, env=twin_env(venv)).returncode
    attempts = open(attempts_path).read().splitlines() if os.path.exists(attempts_path) else []
    return rc, attempts


def check_args_for(detectron2, suite_on, check_args):
    """gpu_check.py's options for one detectron2: parts a and b only where it is not in
    ``suite_on``; an explicit --parts in ``check_args`` comes last, so it wins."""
    return ([] if detectron2 in suite_on else ["--parts", "a", "b"]) + list(check_args)


def verdict(rc, attempts):
    """What failed, or None: the check's own result, and any try at the network."""
    problems = []
    if rc != 0:
        problems.append(f"the check exited {rc}")
    if attempts:
        problems.append(f"{len(attempts)} network attempt(s), the GPU machine has none: {attempts[:3]}")
    return "; ".join(problems) or None


# Each probe: a test file, and the evidence that the twin failed for the probe's reason (a text
# in the suite's log, or a host in the network record), not for another.
PROBES = {
    "lost PYTHONPATH": ("""
        import os, subprocess, sys

        def test_subprocess_that_replaces_pythonpath():
            env = dict(os.environ, PYTHONPATH={root!r})
            subprocess.run([sys.executable, "-c", "import yacs"], env=env, check=True)
        """, "No module named 'yacs'"),
    "network": ("""
        import socket

        def test_network_call_that_swallows_its_error():
            try:
                socket.create_connection(("pypi.org", 443), timeout=2).close()
            except OSError:
                pass
        """, "'pypi.org'"),
}


def run_probes(venv, bundle, out):
    """Each probe must make the twin fail, for its own reason; returns the probes that did not."""
    missed = []
    for name, (source, evidence) in PROBES.items():
        folder = os.path.join(out, "probe_" + name.replace(" ", "_"))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "test_probe.py")
            with open(path, "w") as f:
                f.write(textwrap.dedent(source.format(root=ROOT)))
            rc, attempts = run_check(venv, bundle, folder, "registry", ["--parts", "c", "--suite", path])
        with open(os.path.join(folder, "suite_cpu.log")) as f:
            seen = evidence in f.read() or any(evidence in a for a in attempts)
        problem = verdict(rc, attempts)
        caught = problem is not None and seen
        log(f"probe '{name}': " + (f"caught ({problem})" if caught else
                                   f"NOT CAUGHT: {problem or 'the twin passed it'}; {evidence} not seen"))
        if not caught:
            missed.append(name)
    return missed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=os.path.join(ROOT, "gpu_bundle"),
                        help="the folder make gpu-bundle built (for Python 3.12)")
    parser.add_argument("--out", default=os.path.join(ROOT, "output", "gpu_twin"))
    parser.add_argument("--venv", default=os.path.join(ROOT, ".venv-gpu-twin"))
    parser.add_argument("--detectron2", nargs="+", default=["upstream", "registry"],
                        choices=["upstream", "registry"], help="one check for each")
    parser.add_argument("--suite-on", nargs="+", default=None, choices=["upstream", "registry"],
                        help="the detectron2s whose check runs part c, the complete suite (default: every one); "
                             "the others run parts a and b: their install from the bundle, the CUDA tests, speed")
    parser.add_argument("--no-probes", action="store_true", help="skip the two probes that must fail")
    parser.add_argument("--check-args", nargs=argparse.REMAINDER, default=[],
                        help="passed on to tools/gpu_check.py, e.g. --parts c --suite tests/test_launch.py")
    args = parser.parse_args()
    bundle, out = os.path.abspath(args.bundle), os.path.abspath(args.out)
    if not os.path.isdir(os.path.join(bundle, "wheels")):
        sys.exit(f"[gpu_twin] --bundle {bundle}: no wheels there; build it with make gpu-bundle")
    build_venv(args.venv)
    present = bundle_modules_present(args.venv)
    if present:
        sys.exit(f"[gpu_twin] {args.venv} can import {present} by itself: the twin must hold nothing of the bundle "
                 f"(remove them from {os.path.relpath(REQUIREMENTS, ROOT)})")
    os.makedirs(out, exist_ok=True)
    report = {"python": subprocess.run([venv_python(args.venv), "-c", "import sys; print(sys.version.split()[0])"],
                                       capture_output=True, text=True).stdout.strip(), "checks": {}}
    failed = []
    suite_on = args.detectron2 if args.suite_on is None else args.suite_on
    for detectron2 in args.detectron2:
        started = time.monotonic()
        rc, attempts = run_check(args.venv, bundle, os.path.join(out, detectron2), detectron2,
                                 check_args_for(detectron2, suite_on, args.check_args))
        problem = verdict(rc, attempts)
        report["checks"][detectron2] = {"rc": rc, "network_attempts": attempts, "problem": problem,
                                        "suite": detectron2 in suite_on,
                                        "seconds": round(time.monotonic() - started)}
        log(f"check with detectron2 {detectron2}: " + (f"FAILED: {problem}" if problem else "passed")
            + f" in {report['checks'][detectron2]['seconds']} s")
        failed += [detectron2] if problem else []
    if not args.no_probes:
        missed = run_probes(args.venv, bundle, out)
        report["probes_not_caught"] = missed
        failed += [f"probe '{m}'" for m in missed]
    with open(os.path.join(out, "twin.json"), "w") as f:
        json.dump(report, f, indent=1)
    log(("FAILED: " + ", ".join(failed)) if failed else f"passed: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
