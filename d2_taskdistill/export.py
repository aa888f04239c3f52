"""Export a distilled student as a plain detectron2 checkpoint and config."""
import contextlib
import os

import torch

from detectron2.config import CfgNode, get_cfg
from detectron2.utils.file_io import PathManager

from .data.config_datasets import CLASS_NAMES_FILE, num_classes_setting, recorded_class_names, write_class_names
from .modeling.meta_arch import student_config

STUDENT_PREFIX = "student."
GROUP_NORM_FACTORY_NAME = "d2_taskdistill.compat.group_norm_factory"


def student_state_dict(model_state):
    """The student's weights from a TaskDistillDetector state dict (adapters dropped)."""
    state = {k[len(STUDENT_PREFIX):]: v for k, v in model_state.items() if k.startswith(STUDENT_PREFIX)}
    if not state:
        raise KeyError("the checkpoint has no 'student.*' weights: is it a TaskDistillDetector checkpoint?")
    return state


def drop_keys_missing_from(cfg, reference, keep=(), prefix=""):
    """Remove (in place) every key of ``cfg`` that ``reference`` lacks, except ``keep``."""
    for key in list(cfg.keys()):
        name = prefix + key
        if name in keep:
            continue
        if key not in reference:
            cfg.pop(key)
        elif isinstance(cfg[key], CfgNode):
            drop_keys_missing_from(cfg[key], reference[key], keep, name + ".")


def check_weights_fit(student_cfg, weights_path, source):
    """Build the plain student of ``student_cfg`` on the CPU and load ``weights_path`` into it;
    every key must load (class count, head and FPN shapes), or the export is an error naming
    both sides, never a model that silently predicts nothing."""
    from detectron2.modeling import build_model

    from .modeling.teacher import weight_problems

    probe = student_cfg.clone()
    probe.MODEL.DEVICE = "cpu"
    probe.MODEL.WEIGHTS = ""
    problems = weight_problems(build_model(probe), weights_path)
    if problems:
        raise ValueError(
            f"The student weights in {source!r} do not fit the config being exported "
            f"({probe.MODEL.META_ARCHITECTURE}, {'='.join(map(str, num_classes_setting(probe)))}): "
            + "; ".join(problems)
            + ". Export with the config the weights were trained with: the run's own config.yaml "
            "(tools/export_student.py --run <its OUTPUT_DIR>, or --config-file <OUTPUT_DIR>/config.yaml).")


@contextlib.contextmanager
def staged_files(output_dir):
    """``stage(name) -> path``: files written under temporary names in ``output_dir`` and renamed
    to ``name`` only once the whole export succeeded. On an error nothing new is left: the
    temporary files go, and so does ``output_dir`` if this created it (the files already there
    stay as they were)."""
    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    staged = {}

    def stage(name):
        staged[name] = os.path.join(output_dir, f".partial-{name}")  # keeps the extension the loaders read
        return staged[name]

    try:
        yield stage
    except BaseException:
        for path in staged.values():
            if os.path.exists(path):
                os.remove(path)
        if created and not os.listdir(output_dir):
            os.rmdir(output_dir)
        raise
    for name, path in staged.items():
        os.replace(path, os.path.join(output_dir, name))


@contextlib.contextmanager
def staged_export(output_dir, dataset, weights):
    """What both exports write first, staged (:func:`staged_files`): the class names (the likeliest
    failure, first) and the student's weights. Yields (stage, the staged weights to check, the
    final weights path the config names)."""
    weights_path = exported_paths(output_dir)[0]
    with staged_files(output_dir) as stage:
        write_class_names_record(dataset, weights, stage(CLASS_NAMES_FILE))
        staged_weights = stage("model_final.pth")
        write_student_weights(weights, staged_weights)
        yield stage, staged_weights, weights_path


def exported_paths(output_dir):
    """(checkpoint, config, class names) of an export in ``output_dir``; the checkpoint's path is
    absolute: the exported config names it, and then loads from any working directory."""
    return (os.path.abspath(os.path.join(output_dir, "model_final.pth")), os.path.join(output_dir, "config.yaml"),
            os.path.join(output_dir, CLASS_NAMES_FILE))


def write_student_weights(weights, path):
    with PathManager.open(weights, "rb") as f:
        checkpoint = torch.load(f, map_location="cpu")  # weights_only: a trainer checkpoint holds tensors and numbers
    torch.save({"model": student_state_dict(checkpoint["model"]), "__author__": "d2_taskdistill export"}, path)


def write_class_names_record(dataset, weights, path):
    """The training set's class names (registered here, or recorded by the run beside ``weights``)."""
    write_class_names(path, *recorded_class_names(dataset, os.path.dirname(os.path.abspath(weights)), "export"))


def plain_detectron2_targets(node):
    """Replace (in place) this project's classes in a LazyConfig by detectron2's own, where they
    are detectron2's with an extra guard: FileNamingMapper -> DatasetMapper, the project's FCOS
    -> detectron2's FCOS (same parameters), dataset_evaluator -> COCOEvaluator / VOC's, and
    group_norm_factory -> "GN" (v0.6's heads build "GN" only with d2_taskdistill imported)."""
    from omegaconf import DictConfig, ListConfig

    from detectron2.data import DatasetMapper
    from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
    from detectron2.modeling.meta_arch.fcos import FCOS as D2FCOS

    from .compat import group_norm_factory
    from .engine import FileNamingMapper, dataset_evaluator
    from .modeling.fcos import FCOS

    if isinstance(node, ListConfig):
        for item in node:
            plain_detectron2_targets(item)
        return
    if not isinstance(node, DictConfig):
        return
    norm = node.get("norm", None)
    if norm is group_norm_factory or norm == GROUP_NORM_FACTORY_NAME:
        node.norm = "GN"  # the same layers for every channel count of 32 or more
    target = node.get("_target_", None)
    if target is FileNamingMapper:
        node._target_ = DatasetMapper
    elif target is FCOS:
        node._target_ = D2FCOS
    elif target is dataset_evaluator:
        from detectron2.data import MetadataCatalog

        voc = MetadataCatalog.get(node.dataset_name).get("evaluator_type", None) == "pascal_voc"
        node._target_ = PascalVOCDetectionEvaluator if voc else COCOEvaluator
        if voc:
            del node.output_dir
    for key in node:
        if key != "_target_":
            plain_detectron2_targets(node._get_node(key))


def export_lazy_student(cfg, weights, output_dir, device="cpu"):
    """The LazyConfig export: ``config.yaml`` is a plain detectron2 LazyConfig whose ``model`` is
    the student (``cfg.model.student``), with the run's ``dataloader`` and ``train.init_checkpoint``
    set to the exported ``model_final.pth``; ``LazyConfig.load`` + ``instantiate(cfg.model)`` +
    ``DetectionCheckpointer`` load it with detectron2's classes (:func:`plain_detectron2_targets`).
    The weights must load completely (ValueError otherwise). Returns (checkpoint, config, metadata paths).
    """
    from detectron2.config import instantiate
    from omegaconf import OmegaConf

    from .lazy_engine import save_portable
    from .modeling.teacher import weight_problems

    names = cfg.dataloader.train.dataset.names
    dataset = names if isinstance(names, str) else names[0]
    with staged_export(output_dir, dataset, weights) as (stage, staged_weights, weights_path):
        out = OmegaConf.create({"model": cfg.model.student, "dataloader": cfg.dataloader},
                               flags={"allow_objects": True})
        plain_detectron2_targets(out)
        out.train = {"init_checkpoint": weights_path, "device": device, "output_dir": output_dir}
        problems = weight_problems(instantiate(out.model), staged_weights)
        if problems:
            raise ValueError(
                f"The student weights in {weights!r} do not fit model.student of the config being exported: "
                + "; ".join(problems) + ". Export with the config the weights were trained with.")
        save_portable(out, stage("config.yaml"))
    return exported_paths(output_dir)


def export_student(cfg, weights, output_dir, device="cpu"):
    """Write ``model_final.pth``, ``config.yaml`` and ``metadata.json`` of the student to
    ``output_dir``.

    ``MODEL.DEVICE`` is set to ``device`` (the CPU unless asked: a training config says
    cuda, which fails on a machine without a GPU). ``metadata.json`` holds the class names
    (``thing_classes``) of the training dataset, for DefaultPredictor + Visualizer. The
    weights must load completely into the student the config builds (ValueError otherwise).

    The config keeps only keys of detectron2's ``get_cfg()`` (project keys such as
    DISTILL and SOLVER.OPTIMIZER are dropped), so RetinaNet configs load with
    detectron2's plain ``get_cfg()``. FCOS configs
    need the ``MODEL.FCOS`` keys (``d2_taskdistill.add_fcos_config``), since
    detectron2 offers FCOS only as a LazyConfig; the weights are those of
    detectron2's own FCOS class either way.
    Returns (checkpoint path, config path, metadata path).
    """
    with staged_export(output_dir, cfg.DATASETS.TRAIN[0], weights) as (stage, staged_weights, weights_path):
        out_cfg = student_config(cfg)
        keep = ["MODEL.FCOS"] if out_cfg.MODEL.META_ARCHITECTURE == "FCOS" else []
        drop_keys_missing_from(out_cfg, get_cfg(), keep)
        out_cfg.MODEL.WEIGHTS = weights_path
        out_cfg.MODEL.DEVICE = device
        check_weights_fit(out_cfg, staged_weights, weights)
        with open(stage("config.yaml"), "w") as f:
            f.write(out_cfg.dump())
    return exported_paths(output_dir)
