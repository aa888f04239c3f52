import os

import pytest
import torch

import d2_taskdistill  # noqa: F401  (applies compat, registers everything)
from d2_taskdistill.data import generate_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

torch.set_num_threads(2)


def config_path(*parts):
    return os.path.join(CONFIGS, *parts)


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory):
    """A small generated digits split: (json path, image dir)."""
    root = str(tmp_path_factory.mktemp("digits"))
    json_path = generate_split(root, "train", num_images=8, image_size=128, seed=3)
    return json_path, os.path.join(root, "train")


@pytest.fixture(scope="session")
def tiny_batch(tiny_digits):
    """Four mapped training inputs (detectron2's DatasetMapper) from the tiny split."""
    from detectron2.data import DatasetMapper
    from detectron2.data.datasets import load_coco_json
    import detectron2.data.transforms as T

    json_path, image_root = tiny_digits
    dicts = load_coco_json(json_path, image_root)
    mapper = DatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(128, 128)],
                           image_format="BGR")
    return [mapper(d) for d in dicts[:4]]
