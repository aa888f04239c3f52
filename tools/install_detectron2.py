#!/usr/bin/env python
"""Install detectron2 into the running Python environment.

Sources, in this order:
1. an already importable detectron2 (>= 0.6): nothing to do;
2. ``D2_TASKDISTILL_DETECTRON2_SOURCE``: a source directory, a source archive
   (.tar.gz/.zip) or a pip-installable URL (e.g.
   ``git+https://github.com/facebookresearch/detectron2.git``), built by pip with
   its C++/CUDA ops (ninja compiles them in parallel);
3. the PyPI sdist ``pb1-detectron2==0.6`` (the official v0.6 Python code
   without C++ sources), built pure-Python with its model-zoo configs kept.
   ``d2_taskdistill.compat`` covers what the missing ``detectron2._C`` breaks.

Offline (tools/gpu_check.py): ``--source ARCHIVE`` and ``--registry-sdist ARCHIVE`` take local
files, and ``--target DIR`` installs into a folder put first on PYTHONPATH, whatever detectron2
the environment already has.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

SOURCE_ENV = "D2_TASKDISTILL_DETECTRON2_SOURCE"
REGISTRY_SDIST = "pb1-detectron2==0.6"
MIN_VERSION = (0, 6)


def installed_version(target=None):
    probe = "import detectron2, sys; sys.stdout.write(detectron2.__version__)"
    env = dict(os.environ)
    if target:
        env["PYTHONPATH"] = os.pathsep.join([target, *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return None
    return tuple(int(x) for x in re.findall(r"\d+", result.stdout)[:2])


def pip(*args):
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def install_from_source(source, target_args=(), offline=False):
    looks_local = not re.match(r"^[a-z+]+://", source)
    if looks_local and not os.path.exists(source):
        sys.exit(f"[install_detectron2] {SOURCE_ENV}={source!r}: no such directory or archive")
    print(f"[install_detectron2] building detectron2 from {SOURCE_ENV}={source}")
    # Without ninja, torch's extension builder compiles the C++ files one at a time.
    if shutil.which("ninja") is None:
        if offline:
            # Offline, pip's retries for it would eat the build's time limit.
            print("[install_detectron2] no ninja on PATH and offline: compiling without it (slower)")
        else:
            pip("install", "-q", "ninja==1.13.2")
    started = time.time()
    pip("install", "--no-build-isolation", *target_args, source)
    print(f"[install_detectron2] built in {time.time() - started:.0f} s")


def install_from_registry_sdist(sdist=None, target_args=()):
    with tempfile.TemporaryDirectory() as tmp:
        if sdist:
            shutil.copy(sdist, tmp)
        else:
            download_registry_sdist(tmp)
        archive = next(f for f in os.listdir(tmp) if f.endswith(".tar.gz"))
        with tarfile.open(os.path.join(tmp, archive)) as tar:
            tar.extractall(tmp, filter="data")
        src = os.path.join(tmp, archive[: -len(".tar.gz")])
        # Its setup.py only packages model-zoo configs found in a top-level configs/.
        zoo = os.path.join(src, "detectron2", "model_zoo", "configs")
        shutil.move(zoo, os.path.join(src, "configs"))
        # Its setup.py always builds detectron2._C, whose C++ sources it lacks.
        setup_py = os.path.join(src, "setup.py")
        with open(setup_py) as f:
            text = f.read()
        if "ext_modules=get_extensions()," not in text:
            sys.exit(f"[install_detectron2] unexpected setup.py in {REGISTRY_SDIST}")
        with open(setup_py, "w") as f:
            f.write(text.replace("ext_modules=get_extensions(),", "ext_modules=[],"))
        print(f"[install_detectron2] installing {REGISTRY_SDIST} pure-Python (no C++ ops)")
        pip("install", "--no-deps", "--no-build-isolation", *target_args, src)


def download_registry_sdist(dest):
    # pip >= 26 refuses this sdist (a direct-URL dependency in its extras).
    pip_version = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, text=True
    ).stdout.split()[1]
    if int(pip_version.split(".")[0]) >= 26:
        sys.exit(
            f"[install_detectron2] pip {pip_version} cannot download {REGISTRY_SDIST}; "
            "install 'pip<26' first (make setup does)."
        )
    pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", dest, REGISTRY_SDIST)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.environ.get(SOURCE_ENV),
                        help=f"upstream detectron2: a source folder, archive or pip URL (default: ${SOURCE_ENV})")
    parser.add_argument("--registry-sdist", help=f"install this local {REGISTRY_SDIST} sdist, not --source")
    parser.add_argument("--target", help="install into this folder (for PYTHONPATH), even where detectron2 imports")
    args = parser.parse_args()
    # Into a folder, offline: detectron2's own requirements are the bundle's business.
    target_args = ("--target", args.target, "--upgrade", "--no-deps") if args.target else ()
    if not args.target:
        version = installed_version()
        if version is not None and version >= MIN_VERSION:
            print(f"[install_detectron2] detectron2 {version} already importable")
            return
        if version is not None:
            sys.exit(f"[install_detectron2] detectron2 {version} is older than 0.6; uninstall it first")
    if args.source and not args.registry_sdist:
        # --target is the offline GPU check's install, as is a pip told to use no index.
        offline = bool(args.target) or os.environ.get("PIP_NO_INDEX", "").lower() in ("1", "true", "yes")
        install_from_source(args.source, target_args, offline)
    else:
        install_from_registry_sdist(args.registry_sdist, target_args)
    version = installed_version(args.target)
    if version is None:
        sys.exit("[install_detectron2] detectron2 still does not import after installing")
    print(f"[install_detectron2] detectron2 {version} installed")


if __name__ == "__main__":
    main()
