"""Build the frozen teacher from its own config file (yaml or LazyConfig .py) and checkpoint."""
import logging
import os
from dataclasses import dataclass, field

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import GeneralizedRCNN, build_model
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.utils.file_io import PathManager

from ..checkpoint import file_sha256
from ..config import YACS_SETTING_NAMES, is_lazy_config_file, load_config
from ..launch import from_main_process
from ..settings import setting, using_setting_names

logger = logging.getLogger(__name__)

DENSE_ARCHITECTURES = ("RetinaNet", "FCOS")
# Faster and Mask R-CNN: the feature losses only (their heads are not dense).
DISTILLABLE_ARCHITECTURES = DENSE_ARCHITECTURES + ("GeneralizedRCNN",)


def resolve_teacher_config_file(name):
    """A yaml or LazyConfig .py path, else a detectron2 model-zoo config name."""
    if not name:
        raise ValueError(
            f"{setting('teacher.config_file')} is empty: set it to the teacher's config (yaml or "
            "LazyConfig .py), a path or a detectron2 model-zoo name such as "
            "'COCO-Detection/retinanet_R_101_FPN_3x.yaml' or 'COCO-Detection/fcos_R_50_FPN_1x.py'."
        )
    if os.path.isfile(name):
        return name
    from detectron2 import model_zoo

    try:
        return model_zoo.get_config_file(name)
    except RuntimeError:
        raise FileNotFoundError(
            f"{setting('teacher.config_file')}={name!r} is neither a file (relative to {os.getcwd()}) "
            "nor a detectron2 model-zoo config name."
        ) from None


def run_files(run_dir, option=None):
    """(config.yaml, checkpoint) of a train_net.py run directory: the checkpoint its
    ``last_checkpoint`` names, else model_final.pth. ``option`` names it in errors (default: the
    teacher's run setting)."""
    option = option or setting("teacher.run")
    config = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config):
        raise FileNotFoundError(
            f"{option}={run_dir!r}: no config.yaml there; name the OUTPUT_DIR of a train_net.py run "
            f"(relative to {os.getcwd()})")
    # Read once, on rank 0: a teacher run still writing could otherwise give each rank another checkpoint.
    name = from_main_process(lambda: _last_checkpoint_name(run_dir))
    weights = os.path.join(run_dir, name)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{option}={run_dir!r}: no checkpoint {name} there; has the run trained?")
    if name != "model_final.pth":
        logger.warning("%s=%r has not finished training: using its last checkpoint %s", option, run_dir, name)
    return config, weights


def _last_checkpoint_name(run_dir):
    last = os.path.join(run_dir, "last_checkpoint")
    if not os.path.isfile(last):
        return "model_final.pth"
    with open(last) as f:
        return f.read().strip()


def teacher_sources(config_file, weights, run):
    """(config file, weights, the setting they come from): the run's config.yaml and
    checkpoint when ``run`` is set, else ``config_file`` and ``weights``."""
    if run:
        config, weights = run_files(run)
        return config, weights, f"{setting('teacher.run')}={run!r} (checkpoint {os.path.basename(weights)})"
    return config_file, weights, setting("teacher.weights")


@dataclass
class TeacherOrigin:
    """Where a teacher came from (its config, yaml or LazyConfig, weights and datasets): the one
    record of it, carried by the teacher as ``teacher.teacher_origin``."""

    source: object  # the yacs CfgNode, or the LazyConfig (omegaconf) with its `model`
    config_file: str
    weights: str
    device: str
    input_format: str = "BGR"
    train_datasets: list = field(default_factory=list)
    weights_setting: str = ""  # where the weights come from (its run's folder, if any), for messages
    sha256: str = ""  # the weights file's expected sha256 (or its first >= 8 hex digits); empty: any

    @property
    def is_lazy(self):
        return not hasattr(self.source, "MODEL")

    def build_model(self):
        if not self.is_lazy:
            return build_model(self.source)
        from detectron2.config import instantiate

        try:
            model = instantiate(self.source.model)
        except Exception as e:  # e.g. an override that added a key the class does not take
            raise ValueError(
                f"{setting('teacher.config_file')}={self.config_file!r} with {setting('teacher.overrides')}: its "
                f"`model` could not be built: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(model, (RetinaNet, FCOS, GeneralizedRCNN)):
            raise ValueError(
                f"{setting('teacher.config_file')}={self.config_file!r}: its `model` is a "
                f"{type(model).__name__}; the teacher must be one of {DISTILLABLE_ARCHITECTURES}."
            )
        return model.to(self.device)


def build_teacher_origin(cfg):
    """The :class:`TeacherOrigin` of a yacs config's DISTILL.TEACHER."""
    t = cfg.DISTILL.TEACHER
    with using_setting_names(YACS_SETTING_NAMES):
        return teacher_origin_from(t.CONFIG_FILE, t.WEIGHTS, t.OPTS, cfg.MODEL.DEVICE, t.RUN, t.SHA256)


def teacher_origin_from(config_file="", weights="", overrides=(), device="cpu", run="", sha256=""):
    """The teacher's :class:`TeacherOrigin`: a yaml config with ``overrides`` as KEY VALUE
    pairs, or a LazyConfig .py with them as key=value overrides. ``run``: a train_net.py
    OUTPUT_DIR whose config.yaml and last checkpoint replace ``config_file`` and ``weights``;
    ``sha256``: the weights file's expected sha256 (or a prefix of at least 8 hex digits)."""
    sha256 = checked_sha256_pin(sha256)
    name, weights, weights_setting = teacher_sources(config_file, weights, run)
    path = resolve_teacher_config_file(name)
    lazy = is_lazy_config_file(path)  # a .py, or the config.yaml of a LazyConfig run
    overrides = [str(o) for o in overrides] if lazy else list(overrides)
    if lazy:
        return _lazy_teacher_origin(name, path, weights, overrides, device, weights_setting, sha256)
    teacher_yacs = load_config(path, overrides)
    teacher_yacs.MODEL.DEVICE = device
    teacher_yacs.MODEL.WEIGHTS = weights
    arch = teacher_yacs.MODEL.META_ARCHITECTURE
    if arch not in DISTILLABLE_ARCHITECTURES:
        raise ValueError(
            f"Teacher config {name!r} has MODEL.META_ARCHITECTURE={arch!r}; "
            f"the teacher must be one of {DISTILLABLE_ARCHITECTURES}."
        )
    return TeacherOrigin(teacher_yacs, name, weights, device, teacher_yacs.INPUT.FORMAT,
                         list(teacher_yacs.DATASETS.TRAIN), weights_setting, sha256)


def checked_sha256_pin(sha256):
    if sha256 and not isinstance(sha256, str):  # a key=value override reads 12345678 as a number
        raise ValueError(f"{setting('teacher.sha256')}={sha256!r} was read as a {type(sha256).__name__}: give the "
                         "hash as a string (on the command line, quoted: sha256=\"'0123abcd'\")")
    pin = str(sha256 or "").strip().lower()
    if pin and (len(pin) < 8 or len(pin) > 64 or any(c not in "0123456789abcdef" for c in pin)):
        raise ValueError(f"{setting('teacher.sha256')}={sha256!r}: give the teacher file's sha256 (64 hex digits, "
                         "as `sha256sum FILE` prints) or its first 8 or more")
    return pin


def _lazy_teacher_origin(name, path, weights, overrides, device, weights_setting, sha256):
    from detectron2.config import LazyConfig

    lazy = LazyConfig.load(path)
    if "model" not in lazy:
        raise ValueError(f"{setting('teacher.config_file')}={name!r} is a LazyConfig that defines no `model`.")
    malformed = [o for o in overrides if "=" not in o]
    if malformed:
        raise ValueError(
            f"{setting('teacher.overrides')}={overrides} for the LazyConfig teacher {name!r}: each override is "
            f"key=value (e.g. 'model.num_classes=20'); these are not: {malformed}"
        )
    try:
        lazy = LazyConfig.apply_overrides(lazy, overrides)
    except Exception as e:  # omegaconf's errors name the key but not the setting
        raise ValueError(f"{setting('teacher.overrides')}={overrides} do not apply to {name!r}: {e}") from e
    mapper = lazy.get("dataloader", {}).get("train", {}).get("mapper", {})
    dataset = lazy.get("dataloader", {}).get("train", {}).get("dataset", {})
    names = dataset.get("names", [])
    return TeacherOrigin(
        lazy, name, weights, device,
        input_format=lazy.model.get("input_format", None) or mapper.get("image_format", "BGR"),
        train_datasets=[names] if isinstance(names, str) else list(names), weights_setting=weights_setting,
        sha256=sha256,
    )


class _RecordingCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that keeps what ``load()`` found incompatible, instead of only
    logging it: the teacher must load completely."""

    incompatible = None

    def _load_model(self, checkpoint):  # fvcore's extension point, called by load()
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def weight_problems(model, path):
    """What does not load when every key of the checkpoint at ``path`` must: a list of
    'missing keys: ...', 'unexpected keys: ...', 'shape mismatches: ...' (empty: all loaded).
    The matching weights are loaded into ``model``."""
    checkpointer = _RecordingCheckpointer(model)
    checkpointer.load(path, checkpointables=[])
    incompatible = checkpointer.incompatible
    if incompatible is None:
        return ["no model weights in the file"]
    problems = []
    wrong_shape = {k for k, _, _ in incompatible.incorrect_shapes}
    missing = sorted(set(incompatible.missing_keys) - wrong_shape)
    if missing:
        problems.append(f"missing keys: {missing}")
    if incompatible.unexpected_keys:
        problems.append(f"unexpected keys: {sorted(incompatible.unexpected_keys)}")
    if incompatible.incorrect_shapes:
        shapes = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in incompatible.incorrect_shapes]
        problems.append(f"shape mismatches: {shapes}")
    return problems


def load_teacher_weights(teacher, weights, source=None, sha256=""):
    """Load every key of ``weights`` into ``teacher``; anything that does not load is an error
    naming ``source``, the setting the weights come from (default: the teacher's weights). With
    ``sha256`` (or a prefix of it), a file with another hash is an error before it is unpickled."""
    source = source or setting("teacher.weights")
    if not weights:
        raise ValueError(
            f"{setting('teacher.weights')} is empty: a teacher without trained weights has nothing to "
            f"teach. Set it to the teacher's checkpoint (.pth or model-zoo .pkl), or {setting('teacher.run')} "
            "to the teacher's train_net.py output directory."
        )
    try:
        local = PathManager.get_local_path(weights)
    except Exception as e:  # download failures surface with the setting named
        raise FileNotFoundError(f"{source}={weights!r} could not be fetched: {e}") from e
    if not os.path.isfile(local):
        raise FileNotFoundError(
            f"{source}={weights!r}: no such file. Train the teacher first (train_net.py with its config) and "
            f"set {setting('teacher.run')} to that run's OUTPUT_DIR, or point {setting('teacher.weights')} "
            "to an existing checkpoint."
        )
    if sha256:
        actual = file_sha256(local)
        if not actual.startswith(sha256):
            raise ValueError(
                f"Teacher weights {source}={weights!r} ({local}) have sha256 {actual}, not the "
                f"{setting('teacher.sha256')}={sha256!r} this run expects: the file was replaced or is another "
                f"one. Point {setting('teacher.weights')} to the expected file, or set {setting('teacher.sha256')} "
                "to the new hash if the change is wanted.")
    problems = weight_problems(teacher, local)
    if problems:
        hint = ""
        if source == setting("teacher.weights"):
            hint = (f" If the weights come from a train_net.py run, set {setting('teacher.run')} to that run's "
                    "OUTPUT_DIR instead: its own config.yaml then builds the teacher.")
        raise KeyError(
            f"Teacher weights {source}={weights!r} do not match the teacher built from "
            f"{setting('teacher.config_file')} (and {setting('teacher.overrides')}): " + "; ".join(problems) + "." + hint
        )
    num_tensors = len(teacher.state_dict())
    logger.info("Loaded teacher weights from %s (%d tensors)", weights, num_tensors)


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_teacher(cfg):
    """The teacher of a yacs config's DISTILL.TEACHER: built, loaded, frozen and in eval mode;
    its TeacherOrigin is ``teacher.teacher_origin``."""
    with using_setting_names(YACS_SETTING_NAMES):
        return _load(build_teacher_origin(cfg))


def load_teacher(config_file="", weights="", overrides=(), device="cpu", run="", sha256=""):
    """The frozen teacher, for LazyConfig models: ``L(load_teacher)(config_file=..., weights=...)``.

    config_file: a yaml or LazyConfig .py path, or a detectron2 model-zoo name; weights: its
    checkpoint (.pth, model-zoo .pkl or URL), every key of which must load; overrides: KEY VALUE
    pairs (yaml) or key=value strings (.py); run: instead of both, the OUTPUT_DIR of a run of
    train_net.py or of detectron2's lazyconfig_train_net.py (its config.yaml and last checkpoint);
    sha256: the weights file's expected sha256 (or its first 8 or more hex digits). The returned
    detector carries its :class:`TeacherOrigin` as ``teacher_origin``.
    """
    return _load(teacher_origin_from(config_file, weights, overrides, device, run, sha256))


def _load(teacher_origin):
    teacher = teacher_origin.build_model()
    load_teacher_weights(teacher, teacher_origin.weights, teacher_origin.weights_setting, teacher_origin.sha256)
    teacher = freeze(teacher)
    teacher.teacher_origin = teacher_origin  # where it came from: input format, datasets, weights
    return teacher
