#!/usr/bin/env python
"""Train or evaluate a detector, distilled or plain, in detectron2's style.

    python train_net.py --config-file configs/digits/retinanet_R18_FPN_student.yaml
    python train_net.py --config-file CFG --num-gpus 8 --resume
    python train_net.py --config-file CFG --num-gpus 2 MODEL.DEVICE cpu   # gloo CPU workers
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file configs/digits/retinanet_R34-R18_tid.py train.max_iter=400
    torchrun --nnodes N --nproc-per-node 8 --max-restarts 3 train_net.py --config-file CFG
"""
import logging
import os
import sys
from datetime import timedelta

import d2_taskdistill  # noqa: F401  (applies compat before detectron2 imports its ops)
from d2_taskdistill import lazy_engine, load_config
from d2_taskdistill.config import is_lazy_config_file
from d2_taskdistill.data.config_datasets import check_datasets
from d2_taskdistill.engine import DistillTrainer, build_model_for_evaluation, resolve_device, setup_project_logger
from d2_taskdistill.schedule import apply_epoch_schedule
from d2_taskdistill.launch import (
    config_device,
    free_dist_url,
    launch,
    run_torchrun_worker,
    started_by_torchrun,
    torchrun_restart_count,
)

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.evaluation import verify_results


def is_lazy(args):
    """A LazyConfig (.py) runs lazyconfig_train_net's way, a yaml config DefaultTrainer's."""
    return is_lazy_config_file(args.config_file)


def setup(args):
    # An epoch count becomes iterations here, so that the run's config.yaml holds them.
    if is_lazy(args):
        cfg = lazy_engine.resolve_device(lazy_engine.load_lazy_config(args.config_file, args.opts))
        if not args.eval_only:
            lazy_engine.apply_lazy_epoch_schedule(cfg)
        output_dir = cfg.train.output_dir
    else:
        cfg = resolve_device(load_config(args.config_file, args.opts))
        if not args.eval_only:
            cfg = apply_epoch_schedule(cfg)
        cfg.freeze()
        output_dir = cfg.OUTPUT_DIR
    # detectron2 saves the config into the output folder; evaluating a run's own config.yaml must
    # leave the run's record as it was.
    saved = os.path.join(output_dir, "config.yaml")
    kept = open(saved, "rb").read() if args.eval_only and os.path.isfile(saved) else None
    default_setup(cfg, args)
    if comm.is_main_process():
        if kept is not None:
            with open(saved, "wb") as f:
                f.write(kept)
        elif is_lazy(args):
            lazy_engine.save_portable(cfg, saved)  # the form both detectron2s load (load_teacher(run=), resume)
    setup_project_logger(output_dir)
    traceback_once_on_console()
    return cfg


def main(args):
    cfg = setup(args)
    try:
        return run(cfg, args)
    except Exception as e:
        # Into log.txt (every rank's): the console gets the traceback once, from the raise.
        log_to_files(logging.ERROR, "%s stopped: %s: %s", "Evaluation" if args.eval_only else "Training",
                     type(e).__name__, e, exc_info=True)
        raise


def log_to_files(level, message, *args, exc_info=False):
    """A record of the project's logger for its log files only, not its console handler."""
    logger = logging.getLogger("d2_taskdistill")
    record = logger.makeRecord(logger.name, level, __file__, 0, message, args,
                               sys.exc_info() if exc_info else None)
    for handler in logger.handlers:
        if not is_console(handler):  # detectron2's file handlers
            handler.handle(record)


def is_console(handler):
    return getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


def traceback_once_on_console():
    """detectron2's train loop logs an exception, then re-raises it: on the console the raise's
    traceback is enough; log.txt keeps the logged one."""
    for handler in logging.getLogger("detectron2").handlers:
        if is_console(handler):
            handler.addFilter(lambda record: record.getMessage() != "Exception during training:")


def run(cfg, args):
    if is_lazy(args):
        if args.eval_only:
            return lazy_engine.evaluate_only(cfg, resume=args.resume)
        trainer = lazy_engine.LazyDistillTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        return getattr(trainer, "last_eval_results", None)
    if args.eval_only:
        check_datasets(cfg, train=False)
        # A distilled model without its teacher: evaluation runs the student alone.
        model = build_model_for_evaluation(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = DistillTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main():
    parser = default_argument_parser()
    parser.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT.total_seconds() / 60,
                        help="minutes a process waits for the others (at start, and in each collective) "
                             "before it gives up: bounds a job whose peer on another machine died")
    args = parser.parse_args()
    # argparse hands everything after the first override to the overrides, flags included.
    misplaced = [o for o in args.opts if o.startswith("--")]
    if misplaced:
        parser.error(f"{misplaced} come after the config overrides, which take everything after the first "
                     "KEY VALUE pair: put the flags before the overrides, e.g. "
                     "train_net.py --config-file CFG --num-gpus 2 --resume SOLVER.MAX_ITER 1000")
    timeout = timedelta(minutes=args.dist_timeout)
    print("Command Line Args:", args)
    device = config_device(args.config_file, args.opts)
    if started_by_torchrun():
        # torchrun started this process (one per GPU or CPU worker): ranks from the environment.
        # After a restart (--max-restarts), the group goes on from the last complete checkpoint.
        if torchrun_restart_count() > 0 and not args.eval_only:
            args.resume = True
        return run_torchrun_worker(main, args=(args,), device=device, timeout=timeout)
    args.dist_url = free_dist_url(args.dist_url, parser.get_default("dist_url"), args.num_gpus, args.num_machines)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        # MODEL.DEVICE cpu: gloo CPU workers, also on a machine with GPUs.
        device=device,
        timeout=timeout,
    )


if __name__ == "__main__":
    invoke_main()
