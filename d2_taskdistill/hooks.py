"""Training features as detectron2 hooks, shared by the yacs trainer (engine.DistillTrainer)
and the LazyConfig one (lazy_engine.LazyDistillTrainer)."""
import faulthandler
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import deque

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import detectron2.utils.comm as comm
from detectron2.engine import HookBase
from detectron2.utils.events import get_event_storage

from .checkpoint import TeacherIdentity, remove_stale_temporary_files
from .data.config_datasets import CLASS_NAMES_FILE, write_class_names
from .launch import from_main_process
from .modeling.inherit import inherit_from_teacher, parts_of
from .settings import setting

logger = logging.getLogger(__name__)


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_distill_model(model):
    from .modeling.meta_arch import TaskDistillDetector

    return isinstance(unwrap(model), TaskDistillDetector)


# detectron2's DefaultTrainer writes metrics every 20 iterations (its PeriodicWriter).
WRITER_PERIOD = 20


class GradScalerMonitor(HookBase):
    """Logs the AMP grad scaler: its scale and the optimizer steps it skipped.

    detectron2's AMPTrainer skips a step silently when float16 gradients overflow; the scaler
    then lowers its scale (by its backoff factor), which is how a skipped step is seen here.
    The comparison runs on the device every step; the host reads the count every ``period``
    iterations and at the last one (reading the scale each step would stall the GPU).
    """

    def __init__(self, grad_scaler, period=WRITER_PERIOD):
        self.grad_scaler = grad_scaler
        self.period = period
        self.skipped_steps = 0
        self._skipped_on_device = 0
        self._scale_before = None
        self._first_iter_of_period = 0

    def _scale(self):
        # The scale tensor itself (GradScaler.get_scale() reads it to the host); None until
        # the scaler's first scale() call, when it is still its initial value.
        scale = self.grad_scaler._get_scale_async()
        return self.grad_scaler.get_scale() if scale is None else scale.detach().clone()

    def before_step(self):
        self._scale_before = self._scale()

    def after_step(self):
        scale = self._scale()
        self._skipped_on_device = self._skipped_on_device + (torch.as_tensor(scale) < self._scale_before).long()
        storage = get_event_storage()
        it = storage.iter
        trainer = getattr(self, "trainer", None)  # None when used outside a trainer
        last = trainer is not None and it + 1 == trainer.max_iter
        if (it + 1) % self.period and not last:
            return
        skipped = int(self._skipped_on_device)  # the host reads, once per period
        scale = float(scale)
        if skipped > self.skipped_steps:
            logger.warning(
                "Iterations %d-%d: float16 gradients overflowed; the grad scaler skipped %d optimizer "
                "step(s) and lowered its scale to %g (%d steps skipped in this run).",
                self._first_iter_of_period, it, skipped - self.skipped_steps, scale, skipped)
        self.skipped_steps = skipped
        self._first_iter_of_period = it + 1
        storage.put_scalar("amp/grad_scale", scale, smoothing_hint=False)
        storage.put_scalar("amp/skipped_steps", skipped, smoothing_hint=False)




# The watchdog's limit on one step: at least its setting's seconds, and this many median steps.
WATCHDOG_STEP_FACTOR = 20
# How a process the watchdog stops exits (as coreutils' `timeout`): torchrun restarts the group.
WATCHDOG_EXIT_CODE = 124


class Watchdog(HookBase):
    """Stops a process whose training step does not finish (a deadlock in a step, a filesystem
    that stopped answering): where a step runs longer than max(``min_seconds``,
    WATCHDOG_STEP_FACTOR x the median step), every thread's Python stack goes to the log and to
    stderr, and the process exits with WATCHDOG_EXIT_CODE, so that torchrun restarts the group from
    the last checkpoint. The launcher stops the other ranks, which wait for it in a collective
    (elsewhere, their own watchdog does). Ranks time their steps alike, so the first to fire may be
    one that waits: while training, a process stopped with SIGTERM (how torchrun and launch() stop
    the rest of a group) writes its stacks to stderr first, so that the hung rank's stacks are
    seen whichever rank fires.
    Evaluations and checkpoint saves (after the step) are not timed: their length depends on the
    test set and the disk. ``min_seconds`` 0 turns it off."""

    def __init__(self, min_seconds, setting_name, exit=os._exit):
        self.min_seconds = float(min_seconds)
        self.setting_name = setting_name
        self._exit = exit
        self._steps = deque(maxlen=200)  # recent step durations, for the median
        self._step_started = None
        self._stop = threading.Event()
        self._thread = None

    def limit(self):
        median = statistics.median(self._steps) if self._steps else 0.0
        return max(self.min_seconds, WATCHDOG_STEP_FACTOR * median)

    def before_train(self):
        if self.min_seconds > 0:
            self._thread = threading.Thread(target=self._watch, name="d2_taskdistill-watchdog", daemon=True)
            self._thread.start()
            if hasattr(faulthandler, "register"):  # POSIX; chain: SIGTERM still ends the process
                faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)

    def before_step(self):
        self._step_started = time.monotonic()

    def after_step(self):
        self._steps.append(time.monotonic() - self._step_started)
        self._step_started = None

    def after_train(self):
        self._stop.set()
        if self._thread is not None and hasattr(faulthandler, "unregister"):
            faulthandler.unregister(signal.SIGTERM)

    def _watch(self):
        poll = max(0.2, min(10.0, self.min_seconds / 10))
        while not self._stop.wait(poll):
            started = self._step_started
            if started is not None and time.monotonic() - started > self.limit():
                self._fire(time.monotonic() - started)
                return

    def _fire(self, elapsed):
        with tempfile.TemporaryFile("w+") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            stacks = f.read()
        # The first step after a (re)start has no median yet: the limit is the setting alone.
        median = f"{statistics.median(self._steps):.2f} s" if self._steps else "none finished yet"
        logger.error(
            "Rank %d: iteration %d has not finished after %.0f s (the limit is the larger of %s=%g s and %d x the "
            "median step, %s): a worker hangs. Exiting with code %d, so that torchrun restarts the job from "
            "its last checkpoint. If the training thread below waits in a collective (backward's all-reduce, a "
            "barrier), another rank is the one that hangs: the launcher stops it, and its stacks follow in its "
            "stderr. Python stacks of this process (the training thread is the one inside run_step):\n%s",
            comm.get_rank(), self.trainer.iter, elapsed, self.setting_name, self.min_seconds, WATCHDOG_STEP_FACTOR,
            median, WATCHDOG_EXIT_CODE, stacks)
        sys.stderr.write(stacks)
        for handler in logging.getLogger().handlers + [h for name in ("d2_taskdistill", "detectron2")
                                                        for h in logging.getLogger(name).handlers]:
            handler.flush()
        sys.stderr.flush()
        self._exit(WATCHDOG_EXIT_CODE)


class StudentInit(HookBase):
    """DISTILL.STUDENT_INIT: at a fresh start only (not on resume), the student's neck and/or
    head start from the teacher's weights, after the initial checkpoint has loaded.

    A plain detector (no distillation) starts from the teacher ``build_teacher()`` returns:
    the baseline that inheritance alone gives.
    """

    def __init__(self, choice, build_teacher=None):
        self.choice = choice
        self.build_teacher = build_teacher

    def before_train(self):
        if self.trainer.start_iter != 0:
            return
        model = unwrap(self.trainer.model)
        if is_distill_model(model):
            inherit_from_teacher(model.student, model.teacher, self.choice)
        else:
            inherit_from_teacher(model, self.build_teacher(), self.choice)


class TeacherOnItsInputs(nn.Module):
    """The teacher of a TaskDistillDetector, fed as in training: images in its own channel
    order (the student's test loader gives the student's)."""

    def __init__(self, distill_model):
        super().__init__()
        self.__dict__["distill_model"] = distill_model  # not a submodule: nothing to train or save

    def forward(self, batched_inputs):
        model = self.distill_model
        return model.teacher(model.teacher_inputs(batched_inputs))


# Where the evaluators write the teacher's predictions (OUTPUT_DIR/inference holds the student's).
TEACHER_EVAL_FOLDER = "inference_teacher"


class TeacherEvaluation(HookBase):
    """Evaluates the teacher once before a fresh start (not on resume), with ``evaluate(model)``
    (returns {dataset: metrics}; the trainers' write to OUTPUT_DIR/inference_teacher); logs the
    metrics and writes ``teacher_eval.json`` to ``output_dir``. The results stay in ``self.results``."""

    def __init__(self, evaluate, output_dir, student_alone_run=""):
        self.evaluate = evaluate
        self.output_dir = output_dir
        self.student_alone_run = student_alone_run
        self.results = None

    def before_train(self):
        if self.trainer.start_iter != 0:
            return
        logger.info("Evaluating the teacher before training (its predictions go to %s)",
                    os.path.join(self.output_dir, TEACHER_EVAL_FOLDER))
        self.results = self.evaluate(TeacherOnItsInputs(unwrap(self.trainer.model)))
        if comm.is_main_process():
            for dataset, metrics in self.results.items():
                bbox = metrics.get("bbox", metrics)
                logger.info("Teacher on %s: %s", dataset, ", ".join(f"{k}={v:.2f}" for k, v in bbox.items()))
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "teacher_eval.json"), "w") as f:
                json.dump(self.results, f, indent=1)
            if self.student_alone_run:
                compare_with_student_alone(self.results, self.student_alone_run)


def final_ap(run_dir):
    """The box AP of the last evaluation a train_net.py run wrote to its metrics.json."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{setting('student_alone_run')}={run_dir!r}: no metrics.json there; name the "
                                "OUTPUT_DIR of the student's own run (train_net.py with the student's config)")
    with open(path) as f:
        aps = [value for line in f if line.strip() for key, value in json.loads(line).items()
               if key == "bbox/AP" or key.endswith("/bbox/AP")]
    if not aps:
        raise ValueError(f"{setting('student_alone_run')}={run_dir!r}: its metrics.json holds no evaluation (bbox/AP); "
                         "has that run finished, with a test set?")
    return aps[-1]


def compare_with_student_alone(teacher_results, run_dir):
    """A warning when the teacher is no better than the student trained alone: distilling it
    teaches the student the teacher's mistakes."""
    student_ap = final_ap(run_dir)
    dataset, metrics = next(iter(teacher_results.items()))
    teacher_ap = metrics.get("bbox", metrics)["AP"]
    if teacher_ap > student_ap:
        logger.info("Teacher AP %.2f on %s; the student alone (%s) reached %.2f", teacher_ap, dataset, run_dir, student_ap)
        return
    logger.warning(
        "The teacher (AP %.2f on %s) is not better than the student trained alone (AP %.2f, %s): distillation would "
        "teach the student the teacher's mistakes. Train the teacher longer or larger first (e.g. more %s, a deeper "
        "backbone), then distil.", teacher_ap, dataset, student_ap, run_dir, setting("epochs"))


def warn_unsynced_batch_norm(model):
    """With several processes, plain BatchNorm keeps per-process statistics: say so, and what to set."""
    plain_bn = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    if plain_bn and comm.get_world_size() > 1:
        logger.warning(
            "%d BatchNorm layers (NORM 'BN') with %d processes: each process keeps its own running "
            "statistics (DDP does not broadcast buffers here), checkpoints hold rank 0's and the "
            "evaluation at the end of training uses each rank's own. Set %s to 'SyncBN' for one set of "
            "statistics.", plain_bn, comm.get_world_size(), setting("norm"))


def refuse_amp_off_cuda(amp_enabled, device, amp_setting, device_setting):
    """detectron2's AMPTrainer trains in float16 on CUDA only: say so before anything is built."""
    if amp_enabled and not str(device).startswith("cuda"):
        raise ValueError(f"{amp_setting}=True with {device_setting}={device}: detectron2's AMPTrainer trains in "
                         f"float16 on CUDA only. Set {amp_setting} to False to train on the CPU.")


class NonFiniteLossHint:
    """A trainer mixin: detectron2's trainer reads every loss to the host each step and raises
    FloatingPointError, naming them all, before the optimizer step; this adds what to change
    (``non_finite_hint``, in the config system's own setting names) without a read of its own."""

    non_finite_hint = ""

    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError as e:
            e.add_note(self.non_finite_hint)
            raise


def check_same_teacher_on_all_ranks(identity):
    """Every rank's teacher file has rank 0's sha256 (all ranks call this together), or an error
    on every rank naming those that differ: e.g. a machine with an older copy of the file."""
    if comm.get_world_size() == 1:
        return
    hashes = comm.all_gather((identity.weights, identity.sha256))
    differ = [rank for rank, (_, sha256) in enumerate(hashes) if sha256 != hashes[0][1]]
    if differ:
        files = "; ".join(f"rank {rank}: {weights} (sha256 {sha256[:16]})" for rank, (weights, sha256) in enumerate(hashes)
                          if rank == 0 or rank in differ)
        raise ValueError(
            f"The ranks load different teacher files: ranks {differ} differ from rank 0 ({files}). Every machine "
            f"needs the same teacher file: copy rank 0's to the others, or set {setting('teacher.sha256')} to "
            "the expected hash, so that a wrong copy is named where it is read.")


class DistillFeatures:
    """The project's training features for one run, the same for the yacs trainer
    (engine.DistillTrainer) and the LazyConfig one (lazy_engine.LazyDistillTrainer); each trainer
    gives what its config says, in neutral terms:

    model: the detector (a TaskDistillDetector, or a plain one trained alone);
    output_dir: where the teacher's evaluation is written;
    check_datasets: () -> None, raises on a dataset problem (before the first step);
    student_init: "none", "neck", "head" or "neck+head";
    build_teacher: () -> a teacher, for a plain model's ``student_init`` (a distillation model
        has its own);
    teacher_eval_at_start: evaluate the teacher with ``evaluate(model) -> {dataset: metrics}``
        before a fresh start;
    allow_teacher_change: resume with another teacher than the checkpoint's;
    student_alone_run: the OUTPUT_DIR of the student trained alone: the teacher is evaluated at
        the start and compared with it (a warning when it is not better);
    train_dataset: the training set whose class names the run records (output_dir/metadata.json);
    watchdog: (seconds, the setting's name) of the :class:`Watchdog` (0: none).
    """

    def __init__(self, model, output_dir, check_datasets, student_init="none", build_teacher=None,
                 teacher_eval_at_start=False, allow_teacher_change=False, evaluate=None, student_alone_run="",
                 train_dataset=None, watchdog=(0, "")):
        self.model = unwrap(model)
        self.distill = is_distill_model(self.model)
        self.output_dir = output_dir
        self.check_datasets = check_datasets
        self.student_init = student_init
        self.build_teacher = build_teacher
        self.teacher_eval_at_start = teacher_eval_at_start
        self.allow_teacher_change = allow_teacher_change
        self.evaluate = evaluate
        self.student_alone_run = student_alone_run
        self.train_dataset = train_dataset
        self.watchdog = watchdog
        if student_alone_run and self.distill:
            final_ap(student_alone_run)  # a wrong folder fails now, not after the teacher's evaluation
        self.teacher_evaluation = None
        self.teacher_identity = None
        if self.distill:
            self.teacher_identity = TeacherIdentity(self.model.teacher_origin.weights, allow_teacher_change)
            check_same_teacher_on_all_ranks(self.teacher_identity)

    def add_to_checkpointer(self, checkpointer):
        """Checkpoints record the teacher's identity: a resume with another teacher is refused.
        Temporary files of a save that was killed are removed (rank 0, which saves)."""
        if comm.is_main_process() and checkpointer.save_dir:
            remove_stale_temporary_files(checkpointer.save_dir)
        if self.teacher_identity is not None:
            checkpointer.add_checkpointable("teacher", self.teacher_identity)

    def first_hooks(self):
        """Hooks that run before the first step, in this order (before detectron2's
        IterationTimer, which would count them): the dataset check, the student's init, the
        teacher's evaluation."""
        hooks = [DatasetCheck(self.check_datasets)]
        if self.train_dataset:
            hooks.append(ClassNamesRecord(self.train_dataset, self.output_dir))
        if parts_of(self.student_init):
            # A plain model needs build_teacher: each trainer checks that with its own setting's name.
            hooks.append(StudentInit(self.student_init, build_teacher=None if self.distill else self.build_teacher))
        if self.distill and (self.teacher_eval_at_start or self.student_alone_run):
            self.teacher_evaluation = TeacherEvaluation(self.evaluate, self.output_dir, self.student_alone_run)
            hooks.append(self.teacher_evaluation)
        return hooks

    @property
    def teacher_results(self):
        """The teacher's {dataset: metrics} evaluated at the start, or None."""
        return self.teacher_evaluation.results if self.teacher_evaluation else None

    def step_hooks(self, trainer):
        """To go right after IterationTimer, before the checkpointer, evaluation and writers: the
        watchdog (timing the step, not what follows it) and the grad-scaler monitor where
        ``trainer`` (detectron2's SimpleTrainer or AMPTrainer) scales gradients."""
        seconds, setting_name = self.watchdog
        scaler = getattr(trainer, "grad_scaler", None)
        return ([Watchdog(seconds, setting_name)] if seconds else []) + (
            [GradScalerMonitor(scaler)] if scaler is not None else [])


class ClassNamesRecord(HookBase):
    """The training set's class names into the run's folder before the first step (rank 0): an
    export, or whoever reads the run later, needs them without the dataset's registration (a .py
    config's registrations are not in its saved config.yaml)."""

    def __init__(self, dataset, output_dir):
        self.dataset = dataset
        self.output_dir = output_dir

    def before_train(self):
        if comm.is_main_process():
            os.makedirs(self.output_dir, exist_ok=True)
            write_class_names(os.path.join(self.output_dir, CLASS_NAMES_FILE), self.dataset)


class DatasetCheck(HookBase):
    """Runs ``check()`` (data.config_datasets.check_dataset_names with the run's datasets)
    before the first step: a dataset problem stops the run with the setting to fix, not an
    evaluation hours later. Several processes: rank 0 checks, the others wait for its verdict."""

    def __init__(self, check):
        self.check = check

    def before_train(self):
        from_main_process(self.check)
