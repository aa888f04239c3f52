"""Checkpoints that survive being killed: atomic files, and the teacher they were trained with.

- :class:`SafeCheckpointer` writes every checkpoint and ``last_checkpoint`` to a temporary file
  in the same folder, flushes and fsyncs it, and renames it over the final name (atomic on
  POSIX): a process killed mid-write, or a full disk, leaves the previous files as they were,
  and no reader ever sees half a checkpoint.
- :class:`TeacherIdentity` puts the teacher's weights file and its sha256 into every
  checkpoint; resuming with a different teacher is an error unless allowed.
"""
import hashlib
import logging
import os
import pickle
import re
import tempfile

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from .settings import setting

logger = logging.getLogger(__name__)


# The temporary files SafeCheckpointer's atomic_write leaves when its process is killed mid-write.
TEMPORARY_FILE = re.compile(r"^\.(.+\.pth|last_checkpoint)\.\w+\.tmp$")


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, make it durable, rename it to
    ``path``. On any failure before the rename the temporary file is removed and ``path`` is
    untouched. After it, ``path`` is the new file: a folder fsync the filesystem refuses (EINVAL
    on some network filesystems) is logged, not raised."""
    folder = os.path.dirname(os.path.abspath(path))
    handle = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                         delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        if os.path.exists(handle.name):
            os.unlink(handle.name)
        raise
    try:  # the rename itself durable too
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as e:
        logger.warning("%s is written and renamed into place, but %s cannot be fsynced (%s): the file is "
                       "complete; on this filesystem its rename may not survive a power loss of the server.",
                       path, folder, e)


def remove_stale_temporary_files(folder):
    """Remove the temporary checkpoint files a killed save left in ``folder`` (rank 0 of the run
    that owns the folder, before it saves); returns their names."""
    if not os.path.isdir(folder):
        return []
    stale = sorted(name for name in os.listdir(folder) if TEMPORARY_FILE.match(name))
    for name in stale:
        os.unlink(os.path.join(folder, name))
    if stale:
        logger.info("Removed %d temporary file(s) of an interrupted save from %s: %s", len(stale), folder, stale)
    return stale


class SafeCheckpointer(DetectionCheckpointer):
    """detectron2's DetectionCheckpointer with atomic saves (local folders) and a clear error
    for a checkpoint that cannot be read."""

    _said_not_atomic = False

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        if not os.path.isdir(self.save_dir):  # a remote folder (PathManager): detectron2's way
            self._say_not_atomic()
            try:
                return super().save(name, **kwargs)
            except (OSError, RuntimeError) as e:
                raise OSError(getattr(e, "errno", None), f"Saving checkpoint {name}.pth to {self.save_dir} failed "
                              f"({type(e).__name__}: {e}). The folder is not local, so the file was written in place: "
                              f"{name}.pth there may be partial; remove it. last_checkpoint still names "
                              f"{self._last_name()}; free space and run again with --resume.") from e
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        try:
            atomic_write(path, lambda f: torch.save(data, f))
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            raise OSError(getattr(e, "errno", None), f"Saving checkpoint {path} failed ({type(e).__name__}: {e}); "
                          f"nothing was replaced, the last complete checkpoint ({self._last_name()}) is intact. Free "
                          f"space in {self.save_dir} and run again with --resume.") from e
        self.tag_last_checkpoint(basename)

    def _last_name(self):
        return self.get_checkpoint_file() if self.has_checkpoint() else "none yet"

    def _say_not_atomic(self):
        if not self._said_not_atomic:
            self._said_not_atomic = True
            self.logger.warning(
                "Checkpoints go to %s, which is not a local folder: they are saved with detectron2's plain save "
                "(through PathManager), not atomically. A job killed while saving can leave a partial file there.",
                self.save_dir)

    def tag_last_checkpoint(self, last_filename_basename):
        if not os.path.isdir(self.save_dir):
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"),
                     lambda f: f.write(last_filename_basename.encode()))

    def load(self, path, checkpointables=None):
        if path and "://" not in path and not os.path.isfile(path):
            tagged = self.save_dir and self.has_checkpoint() and os.path.abspath(path) == os.path.abspath(
                self.get_checkpoint_file())
            raise FileNotFoundError(
                f"Checkpoint {path} does not exist" + (
                    f"; {os.path.join(self.save_dir, 'last_checkpoint')} names it. Was it removed or moved? To "
                    f"resume from another checkpoint of {self.save_dir} ({self._other_checkpoints(path) or 'none'}), "
                    "write its name into last_checkpoint; to start over, remove last_checkpoint."
                    if tagged else f" (relative to {os.getcwd()})."))
        return super().load(path, checkpointables)

    def _other_checkpoints(self, path):
        return sorted(os.path.basename(p) for p in self.get_all_checkpoint_files()
                      if os.path.abspath(p) != os.path.abspath(path)) if self.save_dir else []

    def _load_file(self, f):
        try:
            return super()._load_file(f)
        except pickle.UnpicklingError as e:
            refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            if "weights_only" not in str(e):
                raise self._damaged(f, e) from e
            raise RuntimeError(
                f"Checkpoint {f} holds Python objects beyond tensors and numbers"
                + (f" ({refused.group(1)})" if refused else "") + ", which torch loads only with "
                "weights_only=False, that is by running code the file names. This project's and "
                "detectron2's trainers write no such object. If the file is yours and you trust it, keep its "
                "weights only: c = torch.load(path, weights_only=False); torch.save({'model': c['model']}, path)."
            ) from e
        except Exception as e:
            raise self._damaged(f, e) from e

    def _damaged(self, f, e):
        others = self._other_checkpoints(f)
        return RuntimeError(
            f"Checkpoint {f} cannot be read ({type(e).__name__}: {e}): it is damaged or truncated (this "
            "project writes checkpoints atomically, so not by a run it interrupted). Remove it; to resume "
            f"from an earlier complete checkpoint of {self.save_dir or 'its folder'} ({others or 'none'}), "
            "write that file's name into last_checkpoint there, then run again with --resume.")


def check_resume_agreement(checkpointer, resume, start_iter, output_dir_setting):
    """After resume_or_load(resume=True), all ranks start at the same iteration from the same checkpoint (all
    ranks call this together), or an error on every rank: a rank that found no checkpoint where
    rank 0 did cannot see its OUTPUT_DIR."""
    if comm.get_world_size() == 1 or not resume:
        return
    found = os.path.basename(checkpointer.get_checkpoint_file()) if checkpointer.has_checkpoint() else ""
    states = comm.all_gather((start_iter, found, os.path.abspath(checkpointer.save_dir or "")))
    first_iter, first_file, folder = states[0]
    blind = [rank for rank, (_, name, _) in enumerate(states) if first_file and not name]
    if blind:
        raise RuntimeError(
            f"Ranks {blind} found no checkpoint in {folder}, where rank 0 resumes from {first_file} (iteration "
            f"{first_iter}): {output_dir_setting} must be one folder that every machine sees (a shared "
            "filesystem), where rank 0 writes the checkpoints and every rank resumes from them.")
    differ = [f"rank {rank}: iteration {it} from {name or 'no checkpoint'}" for rank, (it, name, _) in enumerate(states)
              if (it, name) != (first_iter, first_file)]
    if differ:
        raise RuntimeError(
            f"The ranks resume from different checkpoints: rank 0 at iteration {first_iter} from "
            f"{first_file or 'no checkpoint'}; {'; '.join(differ)}. {output_dir_setting} ({folder}) must be one "
            "shared folder, and no other job may write there.")


_HASHES = {}  # (path, size, mtime) -> sha256: a teacher is checked, pinned and recorded with one read


def file_sha256(path):
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = _read_sha256(path)
    return _HASHES[key]


def _read_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class TeacherIdentity:
    """A checkpointable: the teacher's weights file and content hash. Saved with every
    checkpoint; loading one saved with another teacher (resume) raises, unless allowed."""

    def __init__(self, weights, allow_change=False):
        self.weights = weights
        self.allow_change = allow_change
        self._sha256 = None

    @property
    def sha256(self):
        if self._sha256 is None:  # hashed once, when first saved or compared
            self._sha256 = file_sha256(PathManager.get_local_path(self.weights))
        return self._sha256

    def state_dict(self):
        return {"weights": self.weights, "sha256": self.sha256}

    def load_state_dict(self, state):
        if state.get("sha256") == self.sha256:
            return
        message = (f"the checkpoint was trained with teacher {state.get('weights')!r} (sha256 "
                   f"{str(state.get('sha256'))[:16]}), this run loads {self.weights!r} (sha256 {self.sha256[:16]})")
        if self.allow_change:
            logger.warning("Resuming with another teacher, as %s allows: %s", setting("teacher.allow_change"), message)
            return
        raise ValueError(f"Resuming with another teacher: {message}. Resume with the teacher the run started "
                         f"with, or set {setting('teacher.allow_change')} True to go on with this one.")
