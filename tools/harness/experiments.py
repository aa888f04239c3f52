"""Train-and-evaluate runs shared by the demo and the accuracy benchmark."""
import glob
import json
import logging
import os
import tempfile
import time

import yaml

import d2_taskdistill  # noqa: F401  (the compat layer, before detectron2's modules load)
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils.env import seed_all_rng

from d2_taskdistill.config import load_config
from d2_taskdistill.engine import DistillTrainer, resolve_device

logger = logging.getLogger(__name__)

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
RESULT_FILE = "final_eval.json"


def coco_metrics(results, task="bbox"):
    """The box (``task`` "segm": mask) metrics of DefaultTrainer.test results (one dataset); None
    for a task that was not evaluated."""
    if "bbox" not in results:  # several datasets: take the first
        results = next(iter(results.values()))
    if task not in results:
        return None
    return {k: float(v) for k, v in results[task].items()}


# Config keys that do not change what a run trains (flattened as flatten_results_dict does).
NOT_THE_RUN = {"OUTPUT_DIR", "SOLVER/CHECKPOINT_PERIOD"}


def same_run_config(saved_text, cfg):
    """Whether a run saved with config ``saved_text`` is a run of ``cfg``: equal values on the
    keys both have. A key only one side has is a default added to the code since (the run did
    not use it); OUTPUT_DIR may name the same run by a relative or an absolute path, and how
    often a run saves does not change what it trains."""
    saved = flatten_results_dict(yaml.safe_load(saved_text))
    wanted = flatten_results_dict(yaml.safe_load(cfg.dump()))
    return all(saved[k] == wanted[k] for k in saved.keys() & wanted.keys() - NOT_THE_RUN)


def ap_curve(output_dir, max_iter):
    """[(iteration, box AP)] of the evaluations during training (TEST.EVAL_PERIOD), from metrics.json.
    A periodic evaluation is written at iteration N - 1, the one after training at max_iter.
    An iteration evaluated twice (a resumed run) counts once, with its last value."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    curve = {min(e["iteration"] + 1, max_iter): round(e[k], 3) for e in entries for k in e if k.endswith("bbox/AP")}
    return sorted(curve.items())


def interrupted_at(output_dir, cfg):
    """The iteration an unfinished run of ``cfg`` in ``output_dir`` can resume from (its last
    checkpoint), or None: no checkpoint, or one written with another config. A run stopped
    during its final evaluation resumes at MAX_ITER: it evaluates model_final, trains nothing."""
    config_path = os.path.join(output_dir, "config.yaml")
    if not os.path.exists(config_path):
        return None
    with open(config_path) as f:
        if not same_run_config(f.read(), cfg):
            return None
    return resume_iteration(output_dir, cfg.SOLVER.MAX_ITER)


def resume_iteration(output_dir, max_iter):
    """The iteration a run resumes at from the checkpoint ``last_checkpoint`` names, or None."""
    last = os.path.join(output_dir, "last_checkpoint")
    if not os.path.exists(last):
        return None
    with open(last) as f:
        name = f.read().strip()
    if not os.path.exists(os.path.join(output_dir, name)):
        return None
    if name == "model_final.pth":
        return max_iter
    return int(name[len("model_"):-len(".pth")]) + 1


def train_and_evaluate(config_file, output_dir, opts=(), reuse=True):
    """Train ``config_file`` into ``output_dir`` and evaluate on DATASETS.TEST.

    With ``reuse``, a run whose final model and evaluation exist, trained with the same config,
    is not trained again, and an interrupted one resumes from its last checkpoint (the data
    order after a resume is not the uninterrupted run's: detectron2 restarts the sampler).
    Returns a dict with the box metrics, the wall time, whether it was reused and the
    iteration it resumed from (None: trained from the start).
    """
    result_path = os.path.join(output_dir, RESULT_FILE)
    config_path = os.path.join(output_dir, "config.yaml")
    cfg = resolve_device(load_config(config_file, [*opts, "OUTPUT_DIR", output_dir]))
    cfg.freeze()
    finished = all(os.path.exists(p) for p in (result_path, config_path, os.path.join(output_dir, "model_final.pth")))
    if reuse and finished:
        with open(config_path) as f:
            same_config = same_run_config(f.read(), cfg)
        if same_config:
            with open(result_path) as f:
                result = json.load(f)
            result["reused"] = True
            return result
        logger.info(f"{output_dir} was trained with another config: training it again")
    resume_iter = interrupted_at(output_dir, cfg) if reuse else None
    prepare_output_dir(output_dir, resume_iter, cfg.SEED)
    with open(config_path, "w") as f:
        f.write(cfg.dump())
    return run_and_record(lambda: DistillTrainer(cfg), output_dir, cfg.SOLVER.MAX_ITER, resume_iter,
                          {"config_file": config_file, "opts": list(opts)})


def remove_weights(output_dir):
    """Delete a finished run's checkpoints and saved predictions (hundreds of MB a run, the
    teacher's weights inside): a benchmark keeps its record. Logs and metrics stay."""
    for path in glob.glob(os.path.join(output_dir, "model_*.pth")) + \
            glob.glob(os.path.join(output_dir, "inference", "*.pth")):
        os.remove(path)


def prepare_output_dir(output_dir, resume_iter, seed):
    """Seed the RNGs (as detectron2's default_setup does; the data sampler draws from them) and
    clear what a new run would misread: detectron2's writers append to a previous run's log."""
    if seed >= 0:
        seed_all_rng(seed)
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):
        if name == RESULT_FILE or (resume_iter is None and (name == "metrics.json" or name.startswith("events.out"))):
            os.remove(os.path.join(output_dir, name))
    if resume_iter is not None:
        logger.info(f"{output_dir}: resuming an interrupted run at iteration {resume_iter}")


def run_and_record(make_trainer, output_dir, max_iter, resume_iter, about):
    """Train (resuming when ``resume_iter`` is set), evaluate, and write the result file."""
    start = time.perf_counter()
    trainer = make_trainer()
    trainer.resume_or_load(resume=resume_iter is not None)
    trainer.train()
    result = {
        **about,
        "ap_curve": ap_curve(output_dir, max_iter),
        "metrics": coco_metrics(trainer.last_eval_results),
        "mask_metrics": coco_metrics(trainer.last_eval_results, "segm"),  # Mask R-CNN
        "teacher_metrics": (
            coco_metrics(trainer.teacher_results) if getattr(trainer, "teacher_results", None) else None
        ),
        "seconds": round(time.perf_counter() - start, 1),
        "iterations": max_iter,
        "resumed_from": resume_iter,
    }
    with open(os.path.join(output_dir, RESULT_FILE), "w") as f:
        json.dump(result, f, indent=1)
    result["reused"] = False
    return result


def lazy_run_identity(cfg):
    """What makes two runs of LazyConfigs the same: LazyConfig.save's yaml, output_dir aside."""
    from detectron2.config import LazyConfig

    output_dir, cfg.train.output_dir = cfg.train.output_dir, ""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "config.yaml")
            LazyConfig.save(cfg, path)
            if not os.path.exists(path):  # not serialisable as yaml (LazyConfig.save wrote a .pkl)
                return None
            with open(path) as f:
                return f.read()
    finally:
        cfg.train.output_dir = output_dir


def train_and_evaluate_lazy(cfg, output_dir, about=None, reuse=True):
    """:func:`train_and_evaluate` for a LazyConfig ``cfg`` (a distillation model, or a plain
    student for a baseline), trained into ``output_dir`` by the project's LazyDistillTrainer and
    evaluated with dataloader.test / dataloader.evaluator. A run is reused or resumed when its
    identity (:func:`lazy_run_identity`, saved as run_identity.yaml) is unchanged."""
    from detectron2.config import LazyConfig

    from d2_taskdistill.lazy_engine import LazyDistillTrainer, resolve_device as resolve_lazy_device

    cfg.train.output_dir = output_dir
    resolve_lazy_device(cfg)
    identity = lazy_run_identity(cfg)
    identity_path = os.path.join(output_dir, "run_identity.yaml")
    same = False
    if reuse and identity is not None and os.path.exists(identity_path):
        with open(identity_path) as f:
            same = f.read() == identity
    result_path = os.path.join(output_dir, RESULT_FILE)
    if same and os.path.exists(result_path) and os.path.exists(os.path.join(output_dir, "model_final.pth")):
        with open(result_path) as f:
            result = json.load(f)
        result["reused"] = True
        return result
    resume_iter = resume_iteration(output_dir, cfg.train.max_iter) if same else None
    prepare_output_dir(output_dir, resume_iter, int(cfg.train.get("seed", -1)))
    if identity is not None:
        with open(identity_path, "w") as f:
            f.write(identity)
    LazyConfig.save(cfg, os.path.join(output_dir, "config.yaml"))  # as lazyconfig_train_net's setup does
    return run_and_record(lambda: LazyDistillTrainer(cfg), output_dir, cfg.train.max_iter, resume_iter, about or {})


def digits_config(root, name):
    """A config of the embedded default (configs/digits) of the project at ``root``."""
    return os.path.join(root, "configs", "digits", name)


def digits_teacher_dir(root, detector):
    """Where the digits teacher of ``detector`` is trained: its config's OUTPUT_DIR, shared by
    train_net.py, the demo and the accuracy benchmark (so it is trained once)."""
    cfg = load_config(digits_config(root, f"{detector}_R34_FPN_teacher.yaml"))
    return os.path.join(root, cfg.OUTPUT_DIR)
