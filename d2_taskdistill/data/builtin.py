"""Register the embedded default datasets (lazily: files are generated on first use)."""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .digits import CLASS_NAMES, default_root, generate_split

# name -> (split, number of images); images are 256 x 256.
DIGITS_SPLITS = {
    "digits_det_train": ("train", 1000),
    "digits_det_val": ("val", 200),
}


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


def register_all_digits(root=None):
    root = os.path.join(root or default_root(), "digits_det")
    for name, (split, num_images) in DIGITS_SPLITS.items():
        if name not in DatasetCatalog.list():
            register_digits_coco(name, root, split, num_images)
