"""Register the embedded default datasets (lazily: files are generated on first use).

The same digits data is registered twice: in COCO format (COCO evaluator) and in
Pascal VOC layout (detectron2's VOC loader and evaluator, year 2007 metric).
"""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.datasets import pascal_voc

from .digits import CLASS_NAMES, default_root, generate_split, write_voc_split

# split -> number of images; images are 128 x 128. "tune" (train's digit instances, new
# images) is where open choices are compared; val is kept for the reported numbers.
DIGITS_SPLITS = {"train": 1200, "val": 300, "tune": 300}


def register_digits_coco(name, root, split, num_images, **generate_kwargs):
    """Register a digits split as a COCO-format dataset, generated on first load."""
    image_root = os.path.join(root, split)
    json_file = os.path.join(root, f"{split}.json")

    def load():
        generate_split(root, split, num_images, **generate_kwargs)
        return load_coco_json(json_file, image_root, name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco",
        thing_classes=list(CLASS_NAMES),
    )


def register_digits_voc(name, root, split, num_images, **generate_kwargs):
    """Register a digits split in Pascal VOC layout, generated on first load."""
    voc_dir = os.path.join(root, "voc")

    def load():
        generate_split(root, split, num_images, **generate_kwargs)
        write_voc_split(root, split)
        return pascal_voc.load_voc_instances(voc_dir, split, CLASS_NAMES)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        thing_classes=list(CLASS_NAMES), dirname=voc_dir, year=2007, split=split,
        evaluator_type="pascal_voc",
    )


def register_all_digits(root=None):
    root = os.path.join(root or default_root(), "digits_det")
    registered = DatasetCatalog.list()
    for split, num_images in DIGITS_SPLITS.items():
        if f"digits_det_{split}" not in registered:
            register_digits_coco(f"digits_det_{split}", root, split, num_images)
        if f"digits_det_voc_{split}" not in registered:
            register_digits_voc(f"digits_det_voc_{split}", root, split, num_images)
