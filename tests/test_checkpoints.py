"""Checkpoints under faults: a save killed half-way or stopped by a full disk leaves the previous
checkpoint and last_checkpoint as they were; a damaged checkpoint is named on resume; resuming
with another teacher is an error unless allowed."""
import argparse
import errno
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from d2_taskdistill.checkpoint import TeacherIdentity, file_sha256
from d2_taskdistill.engine import DistillTrainer
from conftest import ROOT, distill_cfg, make_teacher_checkpoint


@pytest.fixture
def teacher(teachers):
    return teachers["retinanet"]


def trained_run(teacher, tiny_dataset, out, opts=()):
    """Three iterations, checkpoints model_0000001.pth (period 2) and model_final.pth."""
    cfg = distill_cfg("retinanet_R34-R18_fitnet.yaml", teacher, out, opts=list(opts))
    DistillTrainer(cfg).train()
    return cfg


def built_trainer(teacher, out):
    """A trainer that has not trained: for what its checkpointer does."""
    return DistillTrainer(distill_cfg("retinanet_R34-R18_fitnet.yaml", teacher, out))


def last_checkpoint(out):
    return (out / "last_checkpoint").read_text()


def test_a_full_disk_leaves_the_previous_checkpoint(teacher, tiny_dataset, tmp_path, monkeypatch):
    from d2_taskdistill import checkpoint

    cfg = trained_run(teacher, tiny_dataset, tmp_path)
    trainer = DistillTrainer(cfg)
    before = sorted(os.listdir(tmp_path))

    def half_then_full(data, f):
        f.write(b"\0" * 1000)  # some bytes reached the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", half_then_full)
    with pytest.raises(OSError, match=r"Saving checkpoint .*model_0000099.pth failed \(OSError: .*No space left"
                                      r".*the last complete checkpoint \(.*model_final.pth\) is intact"):
        trainer.checkpointer.save("model_0000099")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == before  # no new file, no temporary left behind
    assert last_checkpoint(tmp_path) == "model_final.pth"
    assert torch.load(tmp_path / "model_final.pth", weights_only=False)["iteration"] == 2


def test_a_save_killed_half_way_is_never_seen(teacher, tiny_dataset, tmp_path):
    """A real SIGKILL in the middle of torch.save, in a process of its own."""
    cfg = trained_run(teacher, tiny_dataset, tmp_path)
    (tmp_path / "config.yaml").write_text(cfg.dump())
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        import torch
        import d2_taskdistill
        from d2_taskdistill import checkpoint, load_config
        from d2_taskdistill.engine import DistillTrainer
        from conftest import register_tiny_dataset
        register_tiny_dataset({os.environ['D2_TASKDISTILL_TEST_TINY_ROOT']!r})
        trainer = DistillTrainer(load_config({str(tmp_path / 'config.yaml')!r}))
        real_save = torch.save
        def killed_half_way(data, f):
            real_save(data, f)
            f.flush()
            f.truncate(f.tell() // 2)  # half of it on disk
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.torch.save = killed_half_way
        trainer.checkpointer.save("model_0000099")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (tmp_path / "model_0000099.pth").exists()
    assert last_checkpoint(tmp_path) == "model_final.pth"
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 3


def test_a_damaged_refused_or_missing_checkpoint_is_named_on_resume(teacher, tiny_dataset, tmp_path):
    cfg = trained_run(teacher, tiny_dataset, tmp_path)
    final = tmp_path / "model_final.pth"
    final.write_bytes(final.read_bytes()[:5000])  # damaged outside the project (a bad copy)
    with pytest.raises(RuntimeError, match=r"Checkpoint .*model_final.pth cannot be read .*Remove it; to resume "
                                           r"from an earlier complete checkpoint of .*\['model_0000001.pth'\]"):
        DistillTrainer(cfg).resume_or_load(resume=True)
    # Whole, but with an object torch's weights_only loading refuses: told apart from a damaged file.
    torch.save({"model": {}, "note": argparse.Namespace()}, final)
    with pytest.raises(RuntimeError, match=r"Checkpoint .*model_final.pth holds Python objects beyond tensors and "
                                           r"numbers \(argparse.Namespace\), which torch loads only with "
                                           r"weights_only=False.*If the file is yours and you trust it"):
        DistillTrainer(cfg).resume_or_load(resume=True)
    # Gone (e.g. cleaned up by hand) while last_checkpoint still names it.
    os.remove(final)
    with pytest.raises(FileNotFoundError, match=r"Checkpoint .*model_final.pth does not exist; .*last_checkpoint "
                                                r"names it.*\(\['model_0000001.pth'\]\), write its name into "
                                                r"last_checkpoint; to start over, remove last_checkpoint"):
        DistillTrainer(cfg).resume_or_load(resume=True)


def test_resuming_with_another_teacher(teacher, tiny_dataset, tiny_batch, tmp_path):
    cfg = trained_run(teacher, tiny_dataset, tmp_path)
    saved = torch.load(tmp_path / "model_final.pth", weights_only=False)["teacher"]
    assert saved == {"weights": teacher, "sha256": file_sha256(teacher)}

    other = make_teacher_checkpoint("retinanet", str(tmp_path / "other" / "teacher.pth"), tiny_batch[:2])
    assert file_sha256(other) != file_sha256(teacher)
    cfg.defrost()
    cfg.DISTILL.TEACHER.WEIGHTS = other
    cfg.SOLVER.MAX_ITER = 4
    with pytest.raises(ValueError, match=rf"Resuming with another teacher: the checkpoint was trained with teacher "
                                         rf"'{teacher}' .*this run loads '{other}'.*DISTILL.TEACHER.ALLOW_CHANGE True"):
        DistillTrainer(cfg).resume_or_load(resume=True)
    cfg.DISTILL.TEACHER.ALLOW_CHANGE = True
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 3
    trainer.train()  # and the new checkpoint records the new teacher
    assert torch.load(tmp_path / "model_final.pth", weights_only=False)["teacher"]["weights"] == other


def test_teacher_identity_is_hashed_once(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"teacher")
    identity = TeacherIdentity(str(weights))
    assert identity.state_dict()["sha256"] == file_sha256(str(weights))
    weights.write_bytes(b"changed under a running job")
    assert identity.state_dict()["sha256"] != file_sha256(str(weights))  # the one the run started with



def test_temporary_files_of_a_killed_save_are_removed_at_start(teacher, tiny_dataset, tmp_path, caplog):
    tmp_path.mkdir(exist_ok=True)
    stale = [".model_0000003.pth.k2j4x9_a.tmp", ".last_checkpoint.p0q1r2s3.tmp"]
    for name in stale:
        (tmp_path / name).write_bytes(b"\0" * 100)
    (tmp_path / ".notes.tmp").write_text("not a checkpoint's")
    with caplog.at_level("INFO", logger="d2_taskdistill"):
        built_trainer(teacher, tmp_path)
    assert not any((tmp_path / name).exists() for name in stale)
    assert (tmp_path / ".notes.tmp").exists()
    assert f"Removed 2 temporary file(s) of an interrupted save from {tmp_path}: {sorted(stale)}" in caplog.text


def test_a_folder_fsync_refused_after_the_rename_is_reported_truthfully(teacher, tiny_dataset, tmp_path, monkeypatch,
                                                                         caplog):
    """Some network filesystems refuse fsync on a folder (EINVAL): the checkpoint is complete and in
    place, last_checkpoint names it, and the log says what was not made durable."""
    import stat

    from d2_taskdistill import checkpoint

    trainer = built_trainer(teacher, tmp_path)
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    with caplog.at_level("WARNING", logger="d2_taskdistill"):
        trainer.checkpointer.save("model_0000099", iteration=99)
    assert last_checkpoint(tmp_path) == "model_0000099.pth"
    assert torch.load(tmp_path / "model_0000099.pth", weights_only=False)["iteration"] == 99
    assert re.search(r"model_0000099.pth is written and renamed into place, but .* cannot be fsynced \(\[Errno 22\] "
                     r"Invalid argument\): the file is complete", caplog.text)


def test_a_folder_that_is_not_local_is_said_to_be_saved_plainly_once(teacher, tiny_dataset, tmp_path, monkeypatch,
                                                                      caplog):
    from d2_taskdistill import checkpoint

    trainer = built_trainer(teacher, tmp_path)
    # As for a PathManager URL (e.g. manifold://): not a folder this process can rename in.
    monkeypatch.setattr(checkpoint.os.path, "isdir", lambda path: False)
    with caplog.at_level("WARNING"):
        trainer.checkpointer.save("model_0000097")
        trainer.checkpointer.save("model_0000098")
    assert caplog.text.count("which is not a local folder: they are saved with detectron2's plain save") == 1
    assert last_checkpoint(tmp_path) == "model_0000098.pth"


def test_the_watchdog_stops_a_step_that_does_not_finish(caplog):
    """A step still running after max(min_seconds, 20 median steps): every thread's stack in the
    log, then exit code 124. Steps within the limit, and the time between steps, never fire it."""
    import time

    from d2_taskdistill.hooks import WATCHDOG_EXIT_CODE, Watchdog

    exits = []
    watchdog = Watchdog(0.6, "SOLVER.WATCHDOG_SECONDS", exit=exits.append)
    watchdog.trainer = argparse.Namespace(iter=0)
    watchdog.before_train()
    for it in range(3):  # 3 steps of 0.02 s, then an evaluation of 1 s between steps
        watchdog.trainer.iter = it
        watchdog.before_step()
        time.sleep(0.02)
        watchdog.after_step()
    assert watchdog.limit() == 0.6  # 20 median steps are less
    time.sleep(1.0)
    assert exits == []
    watchdog.trainer.iter = 3
    with caplog.at_level("ERROR", logger="d2_taskdistill"):
        watchdog.before_step()
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)  # the step that never ends (this test function is on the stack)
    assert exits == [WATCHDOG_EXIT_CODE]
    assert re.search(r"Rank 0: iteration 3 has not finished after \d s \(the limit is the larger of "
                     r"SOLVER.WATCHDOG_SECONDS=0.6 s and 20 x the median step, 0.0\d s\)", caplog.text)
    assert "test_the_watchdog_stops_a_step_that_does_not_finish" in caplog.text
    watchdog.after_train()


def test_the_watchdog_fires_on_the_first_step_after_a_start(caplog):
    """The first step of a (re)started run has no median step: the limit is the setting alone."""
    import time

    from d2_taskdistill.hooks import Watchdog

    exits = []
    watchdog = Watchdog(0.3, "train.watchdog_seconds", exit=exits.append)
    watchdog.trainer = argparse.Namespace(iter=8)
    watchdog.before_train()
    with caplog.at_level("ERROR", logger="d2_taskdistill"):
        watchdog.before_step()
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
    watchdog.after_train()
    assert len(exits) == 1
    assert ("iteration 8 has not finished after 0 s (the limit is the larger of train.watchdog_seconds=0.3 s and "
            "20 x the median step, none finished yet)") in caplog.text


def test_a_rank_stopped_while_training_writes_its_stacks(tmp_path):
    """SIGTERM (how torchrun and launch() stop the rest of a group) while the watchdog runs: the
    process writes its stacks to stderr and still ends by the signal; after training it does not."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "stopped.py"
    script.write_text(
        "import sys, time, argparse\n"
        "from d2_taskdistill.hooks import Watchdog\n"
        "watchdog = Watchdog(600, 'SOLVER.WATCHDOG_SECONDS')\n"
        "watchdog.trainer = argparse.Namespace(iter=0)\n"
        "watchdog.before_train()\n"
        "if sys.argv[1] == 'after': watchdog.after_train()\n"
        "def waiting_in_a_collective():\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "waiting_in_a_collective()\n")
    for when in ("during", "after"):
        proc = subprocess.Popen([sys.executable, str(script), when], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGTERM, (when, stderr)
        assert ('in waiting_in_a_collective' in stderr) == (when == "during"), (when, stderr)


def test_the_watchdog_limit_grows_with_slow_steps():
    from d2_taskdistill.hooks import Watchdog

    watchdog = Watchdog(600, "train.watchdog_seconds")
    assert watchdog.limit() == 600
    watchdog._steps.extend([40.0, 50.0, 45.0])  # a large model on a slow machine
    assert watchdog.limit() == 20 * 45.0


def test_a_full_disk_on_a_folder_that_is_not_local(teacher, tiny_dataset, tmp_path, monkeypatch):
    """detectron2's plain save writes in place: the error says the file may be partial, and resume
    still goes to the previous checkpoint."""
    from d2_taskdistill import checkpoint

    trainer = built_trainer(teacher, tmp_path)
    trainer.checkpointer.save("model_0000002", iteration=2)
    real_isdir = checkpoint.os.path.isdir
    monkeypatch.setattr(checkpoint.os.path, "isdir", lambda path: False if path == str(tmp_path) else real_isdir(path))
    real_save = torch.save

    def half_then_full(data, f):
        real_save(data, f)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(OSError, match=r"Saving checkpoint model_0000099.pth to .* failed \(OSError: .*No space left.*"
                                      r"The folder is not local, so the file was written in place: model_0000099.pth "
                                      r"there may be partial; remove it. last_checkpoint still names .*model_0000002.pth"):
        trainer.checkpointer.save("model_0000099")
    monkeypatch.undo()
    assert (tmp_path / "model_0000099.pth").exists() and last_checkpoint(tmp_path) == "model_0000002.pth"
    trainer = built_trainer(teacher, tmp_path)
    trainer.resume_or_load(resume=True)  # from model_0000002.pth, saved by an untrained trainer (iteration 0)
    assert trainer.checkpointer.get_checkpoint_file().endswith("model_0000002.pth") and trainer.start_iter == 1
