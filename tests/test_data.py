"""The embedded digits dataset: deterministic, disjoint splits, COCO and VOC views that agree,
and both evaluators scoring perfect predictions at 100."""
import filecmp
import json
import os

import numpy as np
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from d2_taskdistill.data import generate_split, register_digits_coco, register_digits_voc
from d2_taskdistill.data.digits import digit_indices
from d2_taskdistill.engine import build_evaluator
from d2_taskdistill import load_config
from conftest import config_path


def test_same_seed_same_bytes(tmp_path):
    a = generate_split(str(tmp_path / "a"), "val", 6, image_size=96, seed=11)
    b = generate_split(str(tmp_path / "b"), "val", 6, image_size=96, seed=11)
    assert filecmp.cmp(a, b, shallow=False)
    for name in os.listdir(tmp_path / "a" / "val"):
        assert filecmp.cmp(tmp_path / "a" / "val" / name, tmp_path / "b" / "val" / name, shallow=False)
    c = generate_split(str(tmp_path / "c"), "val", 6, image_size=96, seed=12)
    assert not filecmp.cmp(a, c, shallow=False)


def test_digit_instances_disjoint_between_splits():
    train, val = set(digit_indices("train")), set(digit_indices("val"))
    assert not train & val
    assert len(train) + len(val) == 1797 and len(val) == 359


def test_tune_split_reuses_train_digits_in_new_images(tmp_path):
    assert (digit_indices("tune") == digit_indices("train")).all()
    root = str(tmp_path)
    with open(generate_split(root, "train", 3, seed=0)) as f, open(generate_split(root, "tune", 3, seed=0)) as g:
        train_boxes = [a["bbox"] for a in json.load(f)["annotations"]]
        tune_boxes = [a["bbox"] for a in json.load(g)["annotations"]]
    assert train_boxes != tune_boxes
    for name in os.listdir(tmp_path / "tune"):
        assert not filecmp.cmp(tmp_path / "train" / name, tmp_path / "tune" / name, shallow=False)
    with pytest.raises(ValueError, match="tune"):
        generate_split(root, "test", 3)


def test_all_coco_size_buckets_occur(tmp_path):
    with open(generate_split(str(tmp_path), "train", 60, seed=0)) as f:
        areas = np.array([a["area"] for a in json.load(f)["annotations"]])
    assert (areas < 32 ** 2).sum() > 0
    assert ((areas >= 32 ** 2) & (areas < 96 ** 2)).sum() > 0
    assert (areas >= 96 ** 2).sum() > 0


@pytest.fixture(scope="module")
def both_views(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("views"))
    register_digits_coco("views_coco", root, "val", 30, image_size=128, seed=4)
    register_digits_voc("views_voc", root, "val", 30, image_size=128, seed=4)
    return DatasetCatalog.get("views_coco"), DatasetCatalog.get("views_voc")


def test_voc_view_matches_coco_view(both_views):
    coco, voc = both_views
    assert len(coco) == len(voc) == 30
    assert {a["category_id"] for d in coco for a in d["annotations"]} == set(range(10))
    for c, v in zip(coco, voc):
        assert (c["height"], c["width"]) == (v["height"], v["width"])
        with open(c["file_name"], "rb") as f1, open(v["file_name"], "rb") as f2:
            assert f1.read() == f2.read()
        cb = sorted((a["category_id"], *[round(x) for x in a["bbox"]]) for a in c["annotations"])
        # COCO xywh vs VOC xyxy (loaded back to 0-based)
        vb = sorted((a["category_id"], round(a["bbox"][0]), round(a["bbox"][1]),
                     round(a["bbox"][2] - a["bbox"][0]), round(a["bbox"][3] - a["bbox"][1]))
                    for a in v["annotations"])
        assert cb == vb


def perfect_outputs(dicts, xywh):
    outputs = []
    for d in dicts:
        boxes = torch.tensor([a["bbox"] for a in d["annotations"]], dtype=torch.float32)
        if xywh:
            boxes[:, 2:] += boxes[:, :2]
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(boxes)
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        outputs.append({"instances": inst})
    return outputs


@pytest.mark.parametrize("view", ["coco", "voc"])
def test_evaluators_score_perfect_predictions(view, both_views, tmp_path):
    dicts = both_views[0] if view == "coco" else both_views[1]
    name = f"views_{view}"
    cfg = load_config(config_path("digits", "retinanet_R18_FPN_student.yaml"), ["OUTPUT_DIR", str(tmp_path)])
    evaluator = build_evaluator(cfg, name)
    evaluator.reset()
    inputs = [{"image_id": d["image_id"], "height": d["height"], "width": d["width"]} for d in dicts]
    evaluator.process(inputs, perfect_outputs(dicts, xywh=view == "coco"))
    bbox = evaluator.evaluate()["bbox"]
    if view == "coco":
        assert bbox["AP"] == pytest.approx(100.0)
    else:
        assert MetadataCatalog.get(name).evaluator_type == "pascal_voc"
        assert bbox["AP50"] == pytest.approx(100.0)


def test_instance_masks_are_the_digits_pixels_beside_unchanged_images_and_boxes(tmp_path):
    """Generator 3 adds each digit's mask (COCO RLE); images, boxes and areas are generator 2's, so
    the committed records stay valid: the digest below was taken from generator 2's output."""
    import hashlib

    from pycocotools import mask as mask_util

    root = str(tmp_path)
    path = generate_split(root, "val", num_images=20, image_size=128, seed=0)
    coco = json.load(open(path))
    digest = hashlib.sha256()
    for image in coco["images"]:
        digest.update(open(os.path.join(root, "val", image["file_name"]), "rb").read())
    digest.update(json.dumps([(a["image_id"], a["category_id"], a["bbox"], a["area"])
                              for a in coco["annotations"]]).encode())
    assert digest.hexdigest() == "c2ad7f063d194a72bfc7057e7165a6adadc5ac4fe00f2ec9cbb13b9c66dcadef"
    fill = []
    for a in coco["annotations"]:
        mask = mask_util.decode(a["segmentation"])
        assert mask.shape == (128, 128)
        ys, xs = np.nonzero(mask)
        x, y, w, h = a["bbox"]
        # The box is the mask's extent: both come from the same pixels.
        assert (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == (x, y, w, h)
        fill.append(mask.sum() / (w * h))
    assert 0.2 < np.median(fill) < 0.8  # strokes, not filled boxes

    # detectron2 loads them as bitmasks (RLE keeps the holes of 0, 6, 8 and 9).
    from detectron2.data import DatasetMapper
    from detectron2.data.datasets import load_coco_json

    cfg = load_config(config_path("digits", "retinanet_R18_FPN_student.yaml"),
                      ["INPUT.MASK_FORMAT", "bitmask", "MODEL.MASK_ON", "True"])
    record = load_coco_json(path, os.path.join(root, "val"), "masks_check")[0]
    mapped = DatasetMapper(cfg, is_train=True, augmentations=[])(record)["instances"]
    assert mapped.gt_masks.tensor.shape == (len(record["annotations"]), 128, 128)
    first = mask_util.decode(record["annotations"][0]["segmentation"])
    assert torch.equal(mapped.gt_masks.tensor[0], torch.as_tensor(first, dtype=torch.bool))
