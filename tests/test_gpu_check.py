"""The offline GPU check's own machinery (tools/gpu_check.py, tools/gpu_twin.py): the time
budget adds up, a part at its limit is interrupted before it is killed, the twin's network guard
refuses and records, and processes the tests start keep the PYTHONPATH the check gave them."""
import os
import signal
import socket
import subprocess
import sys
import time

from conftest import ROOT, subprocess_env

sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_check  # noqa: E402
import gpu_twin  # noqa: E402


def test_limits_and_suite_minimum_fit_each_devices_budget():
    # cuda: env 15 + nvidia-smi 10 + install 30 + upstream 180 + registry 30 + a 60 + b 75 + 40, reserve 20.
    assert gpu_check.fixed_seconds("cuda") == 460
    assert gpu_check.fixed_seconds("cuda") + gpu_check.LIMITS["cuda"]["c: suite minimum"] == 560
    # cpu (the twin): 30 + 10 + 90 + 720 + 120 + 60 + 150, reserve 20.
    assert gpu_check.fixed_seconds("cpu") == 1200
    for device, limits in gpu_check.LIMITS.items():
        assert gpu_check.check_budget(device, limits["budget"]) is None, device
    # The device run's limit is 600 s: the check, with its start, must end inside it.
    assert gpu_check.LIMITS["cuda"]["budget"] + gpu_check.GRACE <= 600


def test_a_budget_that_cannot_hold_the_parts_is_refused_before_anything_runs(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--bundle", str(tmp_path),
                           "--out", str(tmp_path / "out"), "--budget", "559"],
                          capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 2
    assert "--budget 559 s is too little for --device cuda" in proc.stderr and "need 560 s" in proc.stderr
    assert not (tmp_path / "out").exists()


def _start(code, tmp_path):
    ready = tmp_path / "ready"
    script = f"import os, signal, time\n{code}\nopen({str(ready)!r}, 'w').close()\ntime.sleep(60)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists()
    return proc


def test_a_part_at_its_limit_gets_sigint_and_may_finish_its_reports(tmp_path):
    report = tmp_path / "report"
    proc = _start("def on_int(*_):\n    open(%r, 'w').write('written')\n    os._exit(3)\n"
                  "signal.signal(signal.SIGINT, on_int)" % str(report), tmp_path)
    assert gpu_check.stop(proc, grace=10) == 3
    assert report.read_text() == "written"


def test_a_part_that_ignores_sigint_is_killed_after_the_grace(tmp_path):
    proc = _start("signal.signal(signal.SIGINT, signal.SIG_IGN)", tmp_path)
    started = time.monotonic()
    assert gpu_check.stop(proc, grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 10


def test_twin_network_guard_refuses_and_records_all_but_loopback(tmp_path):
    attempts = tmp_path / "attempts.log"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    code = f"""
import socket, sys
sys.path.insert(0, {os.path.join(ROOT, "tools")!r})
import twin_network_guard
twin_network_guard.install({str(attempts)!r})
socket.create_connection(("127.0.0.1", {server.getsockname()[1]}), timeout=5).close()
socket.getaddrinfo("localhost", 80)
for reach in (lambda: socket.create_connection(("pypi.org", 443), timeout=1),
              lambda: socket.socket().connect(("192.0.2.1", 443))):
    try:
        reach()
        print("reached")
    except OSError as e:
        print("refused:", e)
"""
    try:
        # -S: no site-packages, so no .pth: in the twin itself, its own guard would take these first.
        out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60)
    finally:
        server.close()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines == ["refused: network refused in the GPU twin (socket.getaddrinfo to 'pypi.org'): the GPU machine "
                     "has none",
                     "refused: network refused in the GPU twin (socket.connect to '192.0.2.1'): the GPU machine "
                     "has none"]
    recorded = attempts.read_text().splitlines()
    assert [line.split(" pid ")[0] for line in recorded] == ["socket.getaddrinfo 'pypi.org'",
                                                            "socket.connect '192.0.2.1'"]


def test_twin_verdict_fails_on_a_failed_check_or_any_network_attempt():
    assert gpu_twin.verdict(0, []) is None
    assert gpu_twin.verdict(1, []) == "the check exited 1"
    assert gpu_twin.verdict(0, ["socket.connect '192.0.2.1' pid 7: x"]).startswith("1 network attempt(s)")


def test_a_twin_venv_pip_cannot_install_says_what_it_needs_on_disk(tmp_path, monkeypatch):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("d2td-no-such-package==1.0\n")
    monkeypatch.setattr(gpu_twin, "REQUIREMENTS", str(requirements))
    monkeypatch.setattr(gpu_twin, "find_python", lambda version: sys.executable)
    # Offline: the package is found nowhere, as a full disk or a missing wheel would stop pip.
    for name, value in {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path), "PIP_CONFIG_FILE": os.devnull}.items():
        monkeypatch.setenv(name, value)
    venv = tmp_path / "twin"
    try:
        gpu_twin.build_venv(str(venv))
    except SystemExit as exit:
        message = str(exit.code)
    else:
        raise AssertionError("build_venv returned although pip failed")
    assert f"pip could not install {requirements}" in message and "Free on its disk now: " in message
    assert "about 5.3 GB" in message and "about 2 GB more while it installs" in message
    assert not (venv / ".twin-complete").exists()


def test_twin_runs_the_suite_only_on_the_detectron2s_asked():
    import gpu_check

    def parts(detectron2, check_args=()):
        opts = gpu_check.build_parser().parse_args(["--out", "x", *gpu_twin.check_args_for(detectron2, ["upstream"],
                                                                                      check_args)])
        return opts.parts

    assert parts("upstream") == list(gpu_check.PARTS)
    assert parts("registry") == ["a", "b"]
    assert parts("registry", ["--parts", "c", "--suite", "tests/test_launch.py"]) == ["c"]


def test_processes_the_tests_start_keep_the_pythonpath_they_were_given(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/scratch/site")
    assert subprocess_env()["PYTHONPATH"] == os.pathsep.join([ROOT, "/scratch/site"])
    monkeypatch.delenv("PYTHONPATH")
    assert subprocess_env(EXTRA="1")["PYTHONPATH"] == ROOT and subprocess_env(EXTRA="1")["EXTRA"] == "1"


def test_the_check_runs_every_test_file_with_the_device_heavy_ones_first():
    files = gpu_check.suite_files()
    assert files[:len(gpu_check.SUITE_FIRST)] == gpu_check.SUITE_FIRST
    on_disk = sorted(f for f in os.listdir(os.path.join(ROOT, "tests")) if f.startswith("test_") and f.endswith(".py"))
    assert sorted(os.path.basename(f) for f in files) == [f for f in on_disk if f != "test_cross_version.py"]
    assert len(set(files)) == len(files)
