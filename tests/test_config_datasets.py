"""Datasets declared in the config (DATASETS.COCO / DATASETS.VOC) and the checks they
pass before training, with data the tests write (COCO json and Pascal VOC XML)."""
import json
import logging
import os

import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator

from d2_taskdistill import load_config
from d2_taskdistill.data import CLASS_NAMES, generate_split, write_voc_split
from d2_taskdistill.data.config_datasets import check_datasets, check_voc_annotations_for_evaluation
from d2_taskdistill.config import YACS_SETTING_NAMES
from d2_taskdistill.engine import build_evaluator
from d2_taskdistill.settings import using_setting_names
from d2_taskdistill.modeling.teacher import TeacherOrigin
from conftest import config_path, TEST_DEVICE

STUDENT = config_path("digits", "retinanet_R18_FPN_student.yaml")


@pytest.fixture
def coco_dir(tmp_path):
    """A fresh 8-image COCO-format dataset: (json path, image root)."""
    json_path = generate_split(str(tmp_path / "data"), "train", num_images=8, image_size=128, seed=11)
    return json_path, str(tmp_path / "data" / "train")


def declare(name, json_path, image_root, *opts):
    return load_config(STUDENT, ["MODEL.DEVICE", TEST_DEVICE, "DATASETS.COCO", str([(name, json_path, image_root)]),
                                 "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)", *opts])


def test_coco_declared_in_config_is_registered_and_evaluated_as_coco(coco_dir):
    cfg = declare("cfg_coco_a", *coco_dir)
    declare("cfg_coco_a", *coco_dir)  # loading the same config again is fine
    dicts = DatasetCatalog.get("cfg_coco_a")
    assert len(dicts) == 8 and all(os.path.isfile(d["file_name"]) for d in dicts)
    assert MetadataCatalog.get("cfg_coco_a").thing_classes == CLASS_NAMES
    assert isinstance(build_evaluator(cfg, "cfg_coco_a"), COCOEvaluator)
    with pytest.raises(ValueError, match="'cfg_coco_a' is declared twice"):
        declare("cfg_coco_a", coco_dir[0], "/elsewhere")
    with pytest.raises(ValueError, match="already registered"):
        declare("digits_det_val", *coco_dir)


def test_voc_declared_in_config_gets_the_voc_evaluator(coco_dir, tmp_path):
    root = os.path.dirname(coco_dir[0])
    voc_dir = write_voc_split(root, "train")
    cfg = load_config(STUDENT, ["DATASETS.VOC", str([("cfg_voc_a", voc_dir, "train", 2007, CLASS_NAMES)])])
    assert MetadataCatalog.get("cfg_voc_a").evaluator_type == "pascal_voc"
    assert isinstance(build_evaluator(cfg, "cfg_voc_a"), PascalVOCDetectionEvaluator)
    assert len(DatasetCatalog.get("cfg_voc_a")) == 8
    check_voc_annotations_for_evaluation("cfg_voc_a")  # complete XML passes

    first = sorted(os.listdir(os.path.join(voc_dir, "Annotations")))[0]
    path = os.path.join(voc_dir, "Annotations", first)
    with open(path) as f:
        xml = f.read()
    with open(path, "w") as f:
        f.write(xml.replace("<pose>Unspecified</pose>", "", 1))
    with pytest.raises(ValueError, match=rf"{first}: object 0 has no <pose>.*Unspecified"):
        check_voc_annotations_for_evaluation("cfg_voc_a")
    with pytest.raises(ValueError, match="class names must be a non-empty list"):
        load_config(STUDENT, ["DATASETS.VOC", str([("cfg_voc_b", voc_dir, "train", 2007, "0,1")])])


def test_missing_json_and_image_root_name_the_setting(coco_dir, tmp_path):
    declare("cfg_coco_nojson", str(tmp_path / "absent.json"), coco_dir[1])
    with pytest.raises(FileNotFoundError, match=r"'cfg_coco_nojson' \(DATASETS.COCO\): json_file .*absent.json"):
        DatasetCatalog.get("cfg_coco_nojson")
    declare("cfg_coco_noroot", coco_dir[0], str(tmp_path / "no_images"))
    with pytest.raises(FileNotFoundError, match="image_root .*no_images' is not a directory"):
        DatasetCatalog.get("cfg_coco_noroot")


def test_missing_images_are_counted_before_training(coco_dir):
    json_path, image_root = coco_dir
    os.remove(os.path.join(image_root, "000002.png"))
    os.remove(os.path.join(image_root, "000005.png"))
    declare("cfg_coco_holes", json_path, image_root)
    with pytest.raises(FileNotFoundError, match=r"2 of 8 images are missing, e\.g\. \[.*000002.png.*000005.png"):
        DatasetCatalog.get("cfg_coco_holes")


def test_invalid_boxes_are_dropped_and_counted(coco_dir, tmp_path, caplog):
    json_path, image_root = coco_dir
    with open(json_path) as f:
        coco = json.load(f)
    num_boxes = len(coco["annotations"])
    coco["annotations"][0]["bbox"] = [37, 44, -20, 21]  # negative width
    coco["annotations"][1]["bbox"] = [300, 10, 12, 12]  # right of a 128 px image
    coco["annotations"][2]["bbox"] = [10, 10, 12, 0]  # zero height
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(coco))
    declare("cfg_coco_badboxes", str(bad), image_root)
    with caplog.at_level(logging.WARNING, logger="d2_taskdistill"):
        dicts = DatasetCatalog.get("cfg_coco_badboxes")
    kept = [a["bbox"] for d in dicts for a in d["annotations"]]
    assert len(kept) == num_boxes - 3
    assert [37, 44, -20, 21] not in kept and [300, 10, 12, 12] not in kept
    assert "dropped 3 boxes" in caplog.text and "[37, 44, -20, 21]" in caplog.text


def test_class_lists_and_num_classes_are_checked(coco_dir, tmp_path, caplog):
    json_path, image_root = coco_dir
    cfg = declare("cfg_coco_cls", json_path, image_root)
    check_datasets(cfg)  # 10 digit classes, NUM_CLASSES 10: passes
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    with pytest.raises(ValueError, match="MODEL.RETINANET.NUM_CLASSES=3 but dataset 'cfg_coco_cls' has 10"):
        check_datasets(cfg)

    with open(json_path) as f:
        coco = json.load(f)
    for c in coco["categories"]:
        c["name"] = "digit_" + c["name"]
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(coco))
    cfg = load_config(STUDENT, ["DATASETS.COCO", str([("cfg_coco_cls", json_path, image_root),
                                                      ("cfg_coco_renamed", str(renamed), image_root)]),
                                "DATASETS.TRAIN", "('cfg_coco_cls',)", "DATASETS.TEST", "('cfg_coco_renamed',)"])
    with pytest.raises(ValueError, match="'cfg_coco_cls' and 'cfg_coco_renamed' have different class lists"):
        check_datasets(cfg)

    # A teacher trained on other class names.
    teacher_origin = TeacherOrigin(None, "teacher.yaml", "", "cpu", train_datasets=["cfg_coco_renamed"])
    cfg.DATASETS.TEST = ("cfg_coco_cls",)
    check_datasets(cfg)
    with pytest.raises(ValueError, match=r"teacher's config 'teacher.yaml' trains on 'cfg_coco_renamed'.*digit_0.*"
                                         r"DISTILL.TEACHER.RUN.*set DISTILL.TEACHER.ALLOW_OTHER_CLASS_NAMES True"):
        check_datasets(cfg, teacher_origin)
    # The same classes under other names, accepted on purpose: a warning.
    cfg.DISTILL.TEACHER.ALLOW_OTHER_CLASS_NAMES = True
    with caplog.at_level(logging.WARNING):
        check_datasets(cfg, teacher_origin)
    assert "Compared class by class in this order, as DISTILL.TEACHER.ALLOW_OTHER_CLASS_NAMES allows" in caplog.text
    cfg.DISTILL.TEACHER.ALLOW_OTHER_CLASS_NAMES = False
    # ... whose json its config declares and nothing here has loaded yet: read to compare.
    load_config(STUDENT, ["DATASETS.COCO", str([("cfg_coco_teacher_only", str(renamed), image_root)])])
    unread = TeacherOrigin(None, "teacher.yaml", "", "cpu", train_datasets=["cfg_coco_teacher_only"])
    with pytest.raises(ValueError, match=r"trains on 'cfg_coco_teacher_only'.*digit_0"):
        check_datasets(cfg, unread)


def test_unregistered_dataset_names_the_keys():
    cfg = load_config(STUDENT, ["DATASETS.TRAIN", "('shapes_train',)"])
    with pytest.raises(KeyError, match="'shapes_train' is not registered: declare it in DATASETS.COCO"):
        check_datasets(cfg)


def test_training_set_summary_hand_computed():
    from detectron2.structures import BoxMode

    from d2_taskdistill.data.config_datasets import dataset_summary

    def box(w, h, category):
        return {"bbox": [5, 5, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": category}

    dicts = [{"height": 100, "width": 200, "annotations": [box(10, 10, 0), box(20, 5, 1)]},
             {"height": 400, "width": 300, "annotations": [box(40, 40, 1)]}]
    # Short sides 100 and 300 (median 200); box sides sqrt(w h) 10, 10, 40: p10 10, p50 10,
    # p90 10 + 0.8 x 30 = 34; x0.64 at a 128 px short side: 6.4, 6.4, 21.8. 16 px for the p10 box:
    # 128 x 16 / 6.4 = 320 px, (320 / 128)^2 = 6.25 the pixels.
    with using_setting_names(YACS_SETTING_NAMES):
        line = dataset_summary("hand", dicts, ["bolt", "nut"], input_short_side=128)
    assert line == ("Training set 'hand': 2 images, short side 100-300 px (median 200); 3 boxes, per class "
                    "{'bolt': 1, 'nut': 2}; box side (sqrt of area) p10/p50/p90 10/10/34 px; resized to a 128 px "
                    "short side (x0.64 for the median image), 6/6/22 px. A tenth of the boxes end up under 16 px, "
                    "twice the stride (8 px) of the finest FPN level, where they are hard to detect: a short side "
                    "of about 320 px (INPUT.MIN_SIZE_TRAIN and INPUT.MIN_SIZE_TEST, with MAX_SIZE_* at least as "
                    "large) brings them to 16 px, at about 6.2x the pixels per image")
    # At 400 px: x2, the p10 box is 20 px.
    assert "A tenth" not in dataset_summary("hand", dicts, ["bolt", "nut"], input_short_side=400)
