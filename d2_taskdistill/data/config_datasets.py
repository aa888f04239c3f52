"""Datasets declared in the config (``DATASETS.COCO``, ``DATASETS.VOC``) and the
checks every training or evaluation dataset passes before anything trains.

Registration happens in :func:`d2_taskdistill.load_config`, so ``train_net.py``,
every tool and every launch worker (which loads the config itself) sees them.
detectron2's ``register_coco_instances`` / ``register_pascal_voc`` do the
registering; the loader is wrapped with the checks below.
"""
import contextlib
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc
from detectron2.structures import BoxMode
from detectron2.utils import comm

from ..config import YACS_SETTING_NAMES
from ..settings import current_setting_names, setting, using_setting_names

logger = logging.getLogger(__name__)

# What this process registered from configs: name -> the entry, to tell a repeat from a clash.
_DECLARED = {}
_EXAMPLES = 5  # how many offending files or boxes a message names


def _entry(entry, key, fields):
    if not isinstance(entry, (list, tuple)) or len(entry) != len(fields):
        raise ValueError(f"{key} entry {entry!r}: expected [{', '.join(fields)}]")
    return list(entry)


def _register_once(name, key, entry, register):
    if name in _DECLARED:
        if _DECLARED[name] != entry:
            raise ValueError(f"{key}: dataset {name!r} is declared twice, as {_DECLARED[name]} and {entry}")
        return
    if name in DatasetCatalog.list():
        raise ValueError(f"{key}: dataset name {name!r} is already registered (a builtin?); choose another name")
    register()
    _DECLARED[name] = entry


IMAGE_CHECKS = ("sample", "all", "none")
IMAGE_SAMPLE = 32


def register_datasets_from_config(cfg):
    """Register every dataset of ``DATASETS.COCO`` and ``DATASETS.VOC``; idempotent."""
    with using_setting_names(YACS_SETTING_NAMES):
        register_declared_datasets(cfg.DATASETS.COCO, cfg.DATASETS.VOC, cfg.DATASETS.CHECK_IMAGES)


def register_declared_datasets(coco=(), voc=(), image_check="sample"):
    """Register COCO ``[name, json_file, image_root]`` and VOC ``[name, dirname, split, year,
    [class names]]`` datasets (yacs DATASETS.COCO / VOC, LazyConfig train.coco_datasets /
    voc_datasets) with the project's checks; idempotent."""
    if image_check not in IMAGE_CHECKS:
        raise ValueError(f"{setting('check_images')}={image_check!r}; choose one of {IMAGE_CHECKS}")
    for entry in coco:
        name, json_file, image_root = _entry(entry, setting("coco_datasets"), ["name", "json_file", "image_root"])

        def register(name=name, json_file=json_file, image_root=image_root):
            register_coco_instances(name, {}, json_file, image_root)
            _wrap_loader(name, lambda: _check_coco_files(name, json_file, image_root), image_check,
                         lambda: _unknown_categories(name, json_file))

        _register_once(name, setting("coco_datasets"), (json_file, image_root), register)
    for entry in voc:
        name, dirname, split, year, class_names = _entry(
            entry, setting("voc_datasets"), ["name", "dirname", "split", "year", "[class names]"])
        if isinstance(class_names, str) or not class_names:
            raise ValueError(f"{setting('voc_datasets')} entry {name!r}: class names must be a non-empty list, "
                             f"got {class_names!r}")

        def register(name=name, dirname=dirname, split=split, year=year, class_names=tuple(class_names)):
            register_pascal_voc(name, dirname, split, int(year), list(class_names))
            # detectron2's register_pascal_voc leaves evaluator_type unset.
            MetadataCatalog.get(name).set(evaluator_type="pascal_voc")
            _wrap_loader(name, lambda: _check_voc_files(name, dirname, split), image_check)

        _register_once(name, setting("voc_datasets"), (dirname, split, int(year), tuple(class_names)), register)


def _wrap_loader(name, check_files, image_check="sample", explain_key_error=None):
    load = DatasetCatalog[name]  # the loader detectron2 registered (DatasetCatalog is a dict)
    names = current_setting_names()  # its errors name the settings of the config that declared it

    def checked():
        with using_setting_names(names):
            return checked_dicts(name, load, check_files, image_check, explain_key_error)

    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, checked)


def _unknown_categories(name, json_file):
    """detectron2 fails with a bare KeyError on an annotation whose category_id is not among
    the json's categories: the message it should have given, naming dataset and annotations."""
    with open(json_file) as f:
        data = json.load(f)
    known = {c["id"] for c in data.get("categories", [])}
    bad = [(a.get("id"), a.get("category_id")) for a in data.get("annotations", []) if a.get("category_id") not in known]
    if not bad:
        return None
    return ValueError(
        f"dataset {name!r} ({json_file}): {len(bad)} annotations have a category_id that is not in its "
        f"'categories' {sorted(known)}, e.g. (annotation id, category_id) {bad[:_EXAMPLES]}; fix or drop them")


def check_images(name, dicts, mode):
    """Decode the dataset's images ("sample": IMAGE_SAMPLE spread over it, "all", "none"): an
    unreadable or truncated file is an error naming it, before training starts. Decoded by a
    thread pool (PIL decodes without the GIL), with progress in the log for "all"."""
    if mode == "none":
        return
    step = 1 if mode == "all" else max(1, len(dicts) // IMAGE_SAMPLE)
    records = dicts[::step]
    workers = min(16, os.cpu_count() or 1, len(records))
    report_every = max(1, len(records) // 10)
    if mode == "all":
        logger.info("dataset %r: decoding its %d images (%s 'all'; %d threads)", name, len(records),
                    setting("check_images"), workers)
    with ThreadPoolExecutor(workers) as pool:
        for done, (record, outcome) in enumerate(zip(records, pool.map(_decoded_size, records)), 1):
            _check_decoded(name, record, outcome, mode)
            if mode == "all" and (done % report_every == 0 or done == len(records)):
                logger.info("dataset %r: %d/%d images decoded", name, done, len(records))


def _decoded_size(record):
    """The image's (width, height), or the exception decoding it raised."""
    try:
        with Image.open(record["file_name"]) as image:
            image.load()  # decodes: a truncated file fails here, not at its header
            return image.size
    except Exception as e:
        return e


def _check_decoded(name, record, outcome, mode):
    if isinstance(outcome, Exception):
        raise ValueError(
            f"dataset {name!r}: image {record['file_name']} cannot be read ({type(outcome).__name__}: {outcome}); "
            f"fix or remove it. {setting('check_images')} 'all' decodes every image before training "
            f"(now {mode!r})")
    # detectron2's mapper stops at this image, mid-training, when the annotation says otherwise.
    declared = (record.get("width"), record.get("height"))
    if None not in declared and tuple(declared) != outcome:
        raise ValueError(
            f"dataset {name!r}: image {record['file_name']} is {outcome[0]}x{outcome[1]} but its annotation says "
            f"{declared[0]}x{declared[1]} (width x height): fix the annotation's width and height (its boxes "
            f"are in the same pixels). {setting('check_images')} 'all' checks every image before training "
            f"(now {mode!r})")


def _check_coco_files(name, json_file, image_root):
    where = f"dataset {name!r} (DATASETS.COCO)"
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"{where}: json_file {json_file!r} does not exist (relative to {os.getcwd()})")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"{where}: image_root {image_root!r} is not a directory (relative to {os.getcwd()})")


def _check_voc_files(name, dirname, split):
    split_file = os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")
    for path in (os.path.join(dirname, "Annotations"), os.path.join(dirname, "JPEGImages"), split_file):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"dataset {name!r} (DATASETS.VOC): {path!r} does not exist; dirname must hold "
                "Annotations/, JPEGImages/ and ImageSets/Main/<split>.txt (Pascal VOC layout)"
            )


def checked_dicts(name, load, check_files, image_check="sample", explain_key_error=None):
    """``load()``'s records after the checks: files first, then images, then boxes."""
    check_files()
    try:
        dicts = load()
    except json.JSONDecodeError as e:
        json_file = MetadataCatalog.get(name).get("json_file", "its json_file")
        raise ValueError(f"dataset {name!r}: {json_file} is not valid JSON ({e}); fix the file, or declare the "
                         "dataset with its COCO-format annotation file") from None
    except KeyError:
        problem = explain_key_error() if explain_key_error else None
        if problem is None:
            raise
        raise problem from None
    if not dicts:
        raise ValueError(f"dataset {name!r} has no images")
    # The files are checked once per process, and in a multi-process run by rank 0 only (COCO: 120k
    # files); the others wait for its verdict in the DatasetCheck hook, before the first step.
    if comm.is_main_process() and (name, image_check) not in _FILES_CHECKED:
        check_image_files(name, dicts, image_check)
        _FILES_CHECKED.add((name, image_check))
    return drop_invalid_boxes(name, dicts)


_FILES_CHECKED = set()  # (dataset, image check) whose files this process has checked


def check_image_files(name, dicts, image_check):
    """Every image file exists, and those ``image_check`` chooses decode to their annotated size."""
    missing = [d["file_name"] for d in dicts if not os.path.isfile(d["file_name"])]
    if missing:
        raise FileNotFoundError(
            f"dataset {name!r}: {len(missing)} of {len(dicts)} images are missing, e.g. "
            f"{missing[:_EXAMPLES]}; check the image root / directory the dataset was declared with"
        )
    check_images(name, dicts, image_check)


def _is_invalid(box, width, height):
    x0, y0, x1, y1 = box
    degenerate = x1 <= x0 or y1 <= y0
    outside = x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height
    return degenerate or outside


def drop_invalid_boxes(name, dicts):
    """Drop boxes with non-positive width or height, or entirely outside their image.

    Dropped, not fatal: detectron2 itself drops boxes that end up empty after its
    transforms, but an inverted box (negative width) would be flipped into a different,
    valid box there. Each drop is logged with a count and examples.
    """
    dropped = []
    for record in dicts:
        kept = []
        for ann in record.get("annotations", []):
            box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            if _is_invalid(box, record["width"], record["height"]):
                dropped.append((os.path.basename(record["file_name"]), list(ann["bbox"])))
            else:
                kept.append(ann)
        record["annotations"] = kept
    if dropped:
        logger.warning(
            "Dataset %r: dropped %d boxes with non-positive width/height or outside their image, "
            "e.g. %s (file, bbox as annotated)", name, len(dropped), dropped[:_EXAMPLES],
        )
    return dicts


# The finest FPN level both detectors' heads read (P3): objects much smaller than its stride are hard.
FINEST_STRIDE = 8


def dataset_summary(name, dicts, classes, input_short_side=None):
    """What a training set holds, in one log line: images, boxes per class, image and box sizes;
    with the short side the config resizes images to (``input_short_side``), the box sizes that
    gives and a note when the smallest boxes fall below the finest FPN level's stride."""
    shorts = np.array([min(d["height"], d["width"]) for d in dicts], dtype=float)
    annotations = [a for d in dicts for a in d.get("annotations", [])]
    per_class = np.bincount([a["category_id"] for a in annotations], minlength=len(classes))
    sides = np.array([math.sqrt(max(b[2] - b[0], 0) * max(b[3] - b[1], 0)) for b in (
        BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations)] or [0.0])
    p10, p50, p90 = np.percentile(sides, [10, 50, 90])
    line = (f"Training set {name!r}: {len(dicts)} images, short side {shorts.min():.0f}-{shorts.max():.0f} px "
            f"(median {np.median(shorts):.0f}); {len(annotations)} boxes, per class "
            f"{dict(zip(classes, per_class.tolist()))}; box side (sqrt of area) p10/p50/p90 {p10:.0f}/{p50:.0f}/{p90:.0f} px")
    if input_short_side:
        scale = input_short_side / np.median(shorts)
        line += (f"; resized to a {input_short_side} px short side (x{scale:.2f} for the median image), "
                 f"{p10 * scale:.0f}/{p50 * scale:.0f}/{p90 * scale:.0f} px")
        small = 2 * FINEST_STRIDE
        if p10 * scale < small:
            # The short side that brings the 10th-percentile box to two strides, in steps of 32 px.
            suggested = math.ceil(input_short_side * small / max(p10 * scale, 1e-6) / 32) * 32
            line += (f". A tenth of the boxes end up under {small} px, twice the stride ({FINEST_STRIDE} px) of the "
                     f"finest FPN level, where they are hard to detect: a short side of about {suggested} px "
                     f"({setting('input_size')}) brings them to {small} px, at about "
                     f"{(suggested / input_short_side) ** 2:.1f}x the pixels per image")
    logger.info(line)
    return line


def thing_classes(name):
    """The dataset's class names; loads it when the names come from its annotations (COCO json)."""
    meta = MetadataCatalog.get(name)
    if "thing_classes" not in meta.as_dict():
        DatasetCatalog.get(name)  # load_coco_json sets thing_classes
    classes = meta.get("thing_classes", None)
    if not classes:
        raise ValueError(f"dataset {name!r} has no thing_classes in its metadata")
    return list(classes)


CLASS_NAMES_FILE = "metadata.json"


def write_class_names(path, dataset, names=None):
    """``{"thing_classes": names, "dataset": dataset}`` to ``path`` (a run's record and an export's
    file, for detectron2's predictor and Visualizer), replaced whole; ``names`` default to the
    registered dataset's."""
    record = {"thing_classes": list(names) if names is not None else thing_classes(dataset), "dataset": dataset}
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(partial, path)
    return path


def recorded_class_names(dataset, run_dir, wanted_by):
    """(dataset, class names) of ``dataset`` where it is registered here, else from the
    ``metadata.json`` its training run recorded in ``run_dir``."""
    if dataset in DatasetCatalog.list():
        return dataset, thing_classes(dataset)
    recorded = os.path.join(run_dir, CLASS_NAMES_FILE)
    if os.path.isfile(recorded):
        with open(recorded) as f:
            record = json.load(f)
        return record["dataset"], record["thing_classes"]
    raise KeyError(
        f"{wanted_by}: the training set {dataset!r} is not registered here and the run recorded no class names "
        f"({recorded}: runs of this version write it when training starts). Give the config that registers it "
        "(e.g. the .py that trained the run, as --config-file with --weights), or register the dataset first.")


def student_architecture(cfg):
    """The meta-architecture of the model a yacs config trains (a distillation's: its student's)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    return cfg.DISTILL.STUDENT_ARCHITECTURE if arch == "TaskDistillDetector" else arch


def num_classes_setting(cfg):
    """('MODEL.<HEAD>.NUM_CLASSES', its value) of a RetinaNet, FCOS or R-CNN config, distilled or not;
    (None, None) for other architectures."""
    head = {"RetinaNet": "RETINANET", "FCOS": "FCOS", "GeneralizedRCNN": "ROI_HEADS"}.get(student_architecture(cfg))
    if head is None:
        return None, None
    return f"MODEL.{head}.NUM_CLASSES", cfg.MODEL[head].NUM_CLASSES


def check_voc_annotations_for_evaluation(name):
    """detectron2's VOC evaluator reads <pose>, <truncated>, <difficult> and integer
    <bndbox> corners of every object; fail before training, not at the final evaluation."""
    meta = MetadataCatalog.get(name)
    with open(os.path.join(meta.dirname, "ImageSets", "Main", f"{meta.split}.txt")) as f:
        ids = [line.strip() for line in f if line.strip()]
    problems = []
    for image_id in ids:
        path = os.path.join(meta.dirname, "Annotations", f"{image_id}.xml")
        for i, obj in enumerate(ET.parse(path).findall("object")):
            for tag in ("name", "pose", "truncated", "difficult", "bndbox"):
                if obj.find(tag) is None:
                    problems.append(f"{path}: object {i} has no <{tag}>")
            box = obj.find("bndbox")
            for tag in ("xmin", "ymin", "xmax", "ymax"):
                value = None if box is None or box.find(tag) is None else box.find(tag).text
                if box is not None and (value is None or not value.strip().lstrip("-").isdigit()):
                    problems.append(f"{path}: object {i} <bndbox><{tag}> is {value!r}, not an integer")
        if len(problems) >= _EXAMPLES:
            break
    if problems:
        raise ValueError(
            f"dataset {name!r} (DATASETS.TEST) cannot be evaluated by detectron2's VOC evaluator, which "
            f"reads these tags of every object: {problems[:_EXAMPLES]}. Add them (e.g. "
            "<pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>) or "
            "convert the dataset to COCO json (DATASETS.COCO)."
        )


def keeps_no_image(error):
    """Whether ``error`` is detectron2's assertion that a training set keeps no image
    (get_detection_dataset_dicts: "No valid data found in ...", "Dataset '...' is empty!")."""
    return isinstance(error, AssertionError) and ("No valid data found" in str(error) or "is empty" in str(error))


@contextlib.contextmanager
def no_training_images_named(names):
    """detectron2's bare assertion when a training set keeps no image (none has an annotation):
    the datasets and what to check instead."""
    try:
        yield
    except AssertionError as e:
        if not keeps_no_image(e):
            raise
        raise ValueError(
            f"The training datasets {list(names)} have no image with an annotation ({e}): check the json's "
            "'annotations' (image_id, category_id, bbox); images without any are dropped for training "
            "(DATALOADER.FILTER_EMPTY_ANNOTATIONS)") from None


def check_registered(names):
    for name in names:
        if name not in DatasetCatalog.list():
            raise KeyError(
                f"dataset {name!r} is not registered: declare it in DATASETS.COCO "
                "[name, json_file, image_root] or DATASETS.VOC [name, dirname, split, year, "
                "[class names]], or register it before the config is used"
            )


def check_declared_datasets_used(cfg, train=True):
    """DATASETS.COCO / VOC declared, then not named in DATASETS.TRAIN / TEST: the run would train on
    the config's own (e.g. digits) sets. Checked before the training set is loaded."""
    declared = [entry[0] for entry in [*cfg.DATASETS.COCO, *cfg.DATASETS.VOC]]
    used = [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST] if train else list(cfg.DATASETS.TEST)
    if declared and not set(declared) & set(used):
        raise ValueError(
            f"DATASETS.COCO / DATASETS.VOC declare {declared}, but the run uses {used} (DATASETS.TRAIN "
            f"{tuple(cfg.DATASETS.TRAIN)}, DATASETS.TEST {tuple(cfg.DATASETS.TEST)}): name the declared sets there, "
            f"e.g. DATASETS.TRAIN \"('{declared[0]}',)\" DATASETS.TEST \"('{declared[-1]}',)\"")


def check_datasets(cfg, teacher_origin=None, train=True):
    """Before training (or evaluating) with a yacs config: :func:`check_dataset_names` of its
    DATASETS.TRAIN and DATASETS.TEST and its NUM_CLASSES."""
    check_declared_datasets_used(cfg, train)
    masks = student_architecture(cfg) == "GeneralizedRCNN" and cfg.MODEL.MASK_ON
    with using_setting_names(YACS_SETTING_NAMES):
        check_dataset_names(list(cfg.DATASETS.TRAIN) if train else None, list(cfg.DATASETS.TEST),
                            num_classes_setting(cfg), teacher_origin, input_short_side=max(cfg.INPUT.MIN_SIZE_TRAIN),
                            allow_other_teacher_names=cfg.DISTILL.TEACHER.ALLOW_OTHER_CLASS_NAMES,
                            mask_head=("MODEL.MASK_ON", "set MODEL.MASK_ON False") if masks else None)


def check_dataset_names(train, test, num_classes=(None, None), teacher_origin=None,
                        settings=("DATASETS.TRAIN", "DATASETS.TEST"), input_short_side=None,
                        allow_other_teacher_names=False, mask_head=None):
    """The test datasets load and pass the file and box checks (the training loader has loaded
    the train sets), class lists agree between train and test sets, with the model's class count
    ``num_classes`` ((setting, value); setting None: not checked) and with the teacher's dataset
    (``teacher_origin``: a TeacherOrigin of d2_taskdistill.modeling.teacher), and every training
    annotation has a mask when the student trains a mask head (``mask_head``: (the setting that
    turns it on, how to turn it off); None: no mask head). ``train`` None: only the test sets
    (evaluation). Raises with the setting (``settings`` names them) to fix."""
    train_setting, test_setting = settings
    if train is not None and not train:
        raise ValueError(f"{train_setting} is empty: name the dataset(s) to train on")
    names = list(train or []) + list(test)
    check_registered(names)
    for name in test:
        dicts = DatasetCatalog.get(name)  # up front, not at the first evaluation
        if not any(record.get("annotations") for record in dicts):
            raise ValueError(
                f"dataset {name!r} ({test_setting}) has no annotations: AP cannot be computed on it. "
                f"Evaluate on a labelled set, or set {test_setting} empty to train without evaluation; "
                "for predictions on unlabelled images use DefaultPredictor (docs/usage.md).")
    if not names:
        return
    classes = {name: thing_classes(name) for name in names}
    reference_name = names[0]
    reference = classes[reference_name]
    for name, names_of in classes.items():
        if names_of != reference:
            raise ValueError(
                f"datasets {reference_name!r} and {name!r} have different class lists "
                f"({reference} vs {names_of}): training and test datasets must use the same classes in the same order"
            )
    key, num_classes = num_classes
    if key is not None and num_classes != len(reference):
        raise ValueError(
            f"{key}={num_classes} but dataset {reference_name!r} has {len(reference)} classes "
            f"{reference}: set {key} {len(reference)}"
        )
    for name in test:
        if MetadataCatalog.get(name).get("evaluator_type", None) == "pascal_voc":
            check_voc_annotations_for_evaluation(name)
    if teacher_origin is not None:
        _check_teacher_classes(teacher_origin, reference_name, reference, allow_other_teacher_names)
    logger.info("Datasets checked: %s, %d classes", ", ".join(names), len(reference))
    if train:
        first = DatasetCatalog.get(train[0])
        if mask_head is not None:
            for name in train:
                check_instance_masks(name, first if name == train[0] else DatasetCatalog.get(name),
                                     train_setting, *mask_head)
        dataset_summary(train[0], first, reference, input_short_side)


def check_instance_masks(name, dicts, train_setting, mask_setting, mask_head_off):
    """Every annotation of a mask head's training set has a 'segmentation': without one,
    detectron2's mapper builds no gt_masks and the mask loss fails at the first step."""
    missing = [(d["file_name"], i) for d in dicts for i, a in enumerate(d.get("annotations", ()))
               if "segmentation" not in a]
    if missing:
        total = sum(len(d.get("annotations", ())) for d in dicts)
        raise ValueError(
            f"{mask_setting} trains a mask head, but {len(missing)} of the {total} annotations of dataset "
            f"{name!r} ({train_setting}) have no instance mask ('segmentation'), e.g. (image, annotation index) "
            f"{missing[:_EXAMPLES]}: train on a dataset whose annotations have masks (COCO polygons or RLE), "
            f"or train boxes only: {mask_head_off}")


def _check_teacher_classes(teacher_origin, student_dataset, student_classes, allow_other_names=False):
    for name in teacher_origin.train_datasets:
        try:
            classes = thing_classes(name) if name in DatasetCatalog.list() else None
        except (OSError, ValueError) as e:  # e.g. the teacher trained where its json is, not here
            logger.warning("The teacher's dataset %r cannot be read here (%s): only its class count is checked",
                           name, e)
            continue
        if classes is None:
            logger.warning("The teacher's dataset %r is not registered here: only its class count is checked", name)
            continue
        if list(classes) != student_classes:
            problem = (f"The teacher's config {teacher_origin.config_file!r} trains on {name!r} (its DATASETS.TRAIN) "
                       f"with classes {list(classes)}; the student's dataset {student_dataset!r} has {student_classes}")
            if allow_other_names and len(classes) == len(student_classes):
                logger.warning("%s. Compared class by class in this order, as %s allows.", problem,
                               setting("teacher.allow_other_class_names"))
                continue
            raise ValueError(
                f"{problem}: the teacher's class outputs would be compared with the wrong classes. If the teacher was "
                f"trained on {student_dataset!r}, build it from that run's own config: {setting('teacher.run')} "
                "<the teacher run's OUTPUT_DIR>. If its classes are these under other names, in the same order, set "
                f"{setting('teacher.allow_other_class_names')} True. Otherwise use a teacher trained on these classes."
            )
