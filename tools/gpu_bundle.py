#!/usr/bin/env python
"""Build the bundle an offline GPU machine needs to run tools/gpu_check.py (make gpu-bundle).

    python tools/gpu_bundle.py --out gpu_bundle [--python-version 3.12]
    python tools/gpu_bundle.py --out gpu_bundle --check-only     # verify an existing bundle

The bundle folder holds:
- wheels/: tools/gpu_bundle_requirements.txt as wheels for the target Python (manylinux x86_64);
  a package the registry has only as an sdist is built into a wheel here (pure Python only);
- detectron2/: upstream detectron2's source archive (D2_TASKDISTILL_DETECTRON2_SOURCE: an
  archive or a source folder) and the registry's pb1-detectron2==0.6 sdist, the fallback;
- manifest.json: every file with its size and sha256, and the pins.

Checks, which --check-only repeats: every requirement of every bundled wheel, for the target
Python, is bundled or on tools/gpu_machine.txt; the bundle and the project's files that travel
with it (git's tracked and untracked-not-ignored files) fit the machine's 64 MiB limit; and,
where this machine has the target Python (on PATH or under pyenv), the wheels install into a
fresh environment of it and their modules that need no torch import there.
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
sys.path.insert(0, TOOLS)
from install_detectron2 import SOURCE_ENV, download_registry_sdist  # noqa: E402

from d2_taskdistill.checkpoint import file_sha256  # noqa: E402
REQUIREMENTS = os.path.join(TOOLS, "gpu_bundle_requirements.txt")
MACHINE = os.path.join(TOOLS, "gpu_machine.txt")
TRAVEL_LIMIT = 64 * 2**20
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"]


def read_list(path):
    with open(path) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args):
    subprocess.run([sys.executable, "-m", "pip", *args], check=True,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def download_wheel(pin, wheels, python_version):
    """The pin as a wheel for the target Python; from its sdist where the registry has no wheel."""
    abi = "cp" + python_version.replace(".", "")
    try:
        pip("download", "--no-deps", "--only-binary", ":all:", "--python-version", python_version,
            "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
            *[a for p in PLATFORMS for a in ("--platform", p)], "--platform", "any", "-d", wheels, pin)
        return
    except subprocess.CalledProcessError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", tmp, pin)
        sdist = os.path.join(tmp, os.listdir(tmp)[0])
        pip("wheel", "--no-deps", "--no-build-isolation", "-w", tmp, sdist)
        built = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if len(built) != 1 or not built[0].endswith("-py3-none-any.whl"):
            sys.exit(f"[gpu_bundle] {pin}: the registry has no wheel for Python {python_version} and its sdist "
                     f"built {built}, not one pure-Python wheel: it cannot be built here for another Python")
        shutil.move(os.path.join(tmp, built[0]), wheels)


def add_detectron2_sources(dest):
    """Upstream detectron2 (the Makefile's source) and the registry's v0.6 sdist."""
    source = os.environ.get(SOURCE_ENV, "")
    if not source or not os.path.exists(source):
        sys.exit(f"[gpu_bundle] {SOURCE_ENV}={source!r}: name upstream detectron2's source archive or folder "
                 "(make gpu-bundle sets it to the archive in ../shared/vendor)")
    if os.path.isdir(source):
        with tarfile.open(os.path.join(dest, "detectron2-upstream.tar.gz"), "w:gz") as tar:
            tar.add(source, arcname="detectron2-upstream",
                    filter=lambda info: None if "/.git" in info.name or info.name.endswith(".so") else info)
    else:
        shutil.copy(source, os.path.join(dest, "detectron2-upstream" + archive_suffix(source)))
    download_registry_sdist(dest)


def archive_suffix(path):
    for suffix in (".tar.gz", ".tgz", ".zip"):
        if path.endswith(suffix):
            return suffix
    sys.exit(f"[gpu_bundle] {path}: not a .tar.gz, .tgz or .zip archive")


def wheel_requirements(path, python_version):
    """Requirement names of a wheel, markers evaluated for the target Python on Linux, extras off."""
    from pip._vendor.packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": python_version + ".0",
           "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
           "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "extra": ""}
    with zipfile.ZipFile(path) as whl:
        meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        lines = whl.read(meta).decode().splitlines()
    names = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                names.append(canonical(req.name))
    return names


def wheel_name(filename):
    return canonical(filename.split("-")[0])


def check_bundle(bundle, python_version):
    """Missing requirements and the travelling size; exits non-zero on a problem."""
    wheels = os.path.join(bundle, "wheels")
    files = sorted(f for f in os.listdir(wheels) if f.endswith(".whl"))
    bundled = {wheel_name(f) for f in files}
    pinned = {canonical(re.split(r"[=<>!~ ]", p)[0]) for p in read_list(REQUIREMENTS)}
    problems = []
    if pinned - bundled:
        problems.append(f"pinned but not bundled: {sorted(pinned - bundled)}")
    present = {canonical(n) for n in read_list(MACHINE)} | bundled
    for f in files:
        missing = sorted(set(wheel_requirements(os.path.join(wheels, f), python_version)) - present)
        if missing:
            problems.append(f"{f} needs {missing}: neither bundled nor on tools/gpu_machine.txt")
    d2 = os.listdir(os.path.join(bundle, "detectron2"))
    if not any(n.startswith("detectron2-upstream") for n in d2) or not any(n.startswith("pb1") for n in d2):
        problems.append(f"detectron2/ holds {d2}: upstream's archive and pb1-detectron2's sdist are both needed")
    sizes = {"bundle": folder_size(bundle), "project": project_size()}
    total = sum(sizes.values())
    if total > TRAVEL_LIMIT:
        problems.append(f"bundle + project = {total / 2**20:.1f} MiB, over the 64 MiB that travels")
    return problems, sizes, files


# Modules of the bundled wheels that import with bundled wheels alone (hydra and wheel need
# packaging, fvcore and pycocotools numpy: the GPU machine's, not in a fresh venv).
PURE_MODULES = ["yaml", "yacs", "omegaconf", "antlr4", "termcolor", "pkg_resources"]


def find_python(version):
    """A working python{version} on this machine: on PATH, else a pyenv install; or None."""
    candidates = [shutil.which(f"python{version}"),
                  *sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python{version}")))]
    for exe in filter(None, candidates):
        if subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
            return exe
    return None


def verify_in_fresh_python(bundle, python_version):
    """Install every wheel into a new venv of the target Python and import the pure modules.
    Returns (python used or None, problem or None)."""
    exe = find_python(python_version)
    if exe is None:
        return None, None
    wheels = sorted(glob.glob(os.path.join(bundle, "wheels", "*.whl")))
    with tempfile.TemporaryDirectory() as tmp:
        venv = os.path.join(tmp, "venv")
        steps = [[exe, "-m", "venv", venv],
                 [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q", "--no-index", "--no-deps", *wheels],
                 [os.path.join(venv, "bin", "python"), "-c", "; ".join(f"import {m}" for m in PURE_MODULES)]]
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True)
            if result.returncode != 0:
                return exe, f"in a fresh Python {python_version} venv, {' '.join(step[:4])}... failed: {result.stderr[-1500:]}"
    return exe, None


def folder_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def project_size():
    """Bytes of the files that travel with the working tree: tracked, and untracked not ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout.decode()
    paths = [os.path.join(ROOT, p) for p in out.split("\0") if p]
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "gpu_bundle"))
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (X.Y)")
    parser.add_argument("--check-only", action="store_true", help="check an existing bundle, download nothing")
    args = parser.parse_args()
    if not args.check_only:
        if os.path.exists(args.out):
            shutil.rmtree(args.out)
        for sub in ("wheels", "detectron2"):
            os.makedirs(os.path.join(args.out, sub))
        for pin in read_list(REQUIREMENTS):
            download_wheel(pin, os.path.join(args.out, "wheels"), args.python_version)
        add_detectron2_sources(os.path.join(args.out, "detectron2"))
    problems, sizes, files = check_bundle(args.out, args.python_version)
    python, problem = verify_in_fresh_python(args.out, args.python_version)
    problems += [problem] if problem else []
    if not args.check_only:
        manifest = {"python_version": args.python_version, "pins": read_list(REQUIREMENTS),
                    "files": {os.path.relpath(os.path.join(d, f), args.out): {
                        "bytes": os.path.getsize(os.path.join(d, f)), "sha256": file_sha256(os.path.join(d, f))}
                        for d, _, fs in os.walk(args.out) for f in fs}}
        with open(os.path.join(args.out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    print(f"[gpu_bundle] {args.out}: {len(files)} wheels for Python {args.python_version}; "
          f"bundle {sizes['bundle'] / 2**20:.1f} MiB + project {sizes['project'] / 2**20:.1f} MiB "
          f"= {sum(sizes.values()) / 2**20:.1f} MiB of the 64 MiB that travels")
    if not problem:
        print(f"[gpu_bundle] fresh Python {args.python_version} environment: " + (
            f"no python{args.python_version} on this machine, not checked" if python is None else
            f"{python}: wheels installed, {', '.join(PURE_MODULES)} import"))
    for problem in problems:
        print(f"[gpu_bundle] PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
