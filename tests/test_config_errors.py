"""The likeliest mistakes with a yaml config get a message that names the fix."""
import os
import subprocess
import sys
import threading
from unittest import mock

import pytest

from detectron2.data import DatasetCatalog

from d2_taskdistill import load_config
from d2_taskdistill.config import YACS_SETTING_NAMES
from d2_taskdistill.settings import using_setting_names
from conftest import ROOT, config_path, subprocess_env

STUDENT = config_path("digits", "retinanet_R18_FPN_student.yaml")


@pytest.mark.parametrize("opts,message", [
    (["SOLVER.MAX_ITR", 10], r"the overrides: SOLVER.MAX_ITR is not a config key; did you mean SOLVER.MAX_ITER\?"),
    (["MODEL.RETINANET.NUM_CLASS", 3], r"did you mean MODEL.RETINANET.NUM_CLASSES or MODEL.RETINANET.NUM_CONVS\?"),
    (["DISTILL.TEACHER.RUNS", "x"], r"did you mean DISTILL.TEACHER.RUN or DISTILL.TEACHER.OPTS\?"),
    (["ZZZ.QQQ", 1], r"ZZZ.QQQ is not a config key: see d2_taskdistill/config.py"),
])
def test_an_unknown_key_names_the_closest_ones(opts, message):
    with pytest.raises(KeyError, match=message):
        load_config(STUDENT, opts)


def test_an_unknown_key_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text(f'_BASE_: "{STUDENT}"\nSOLVER:\n  BASE_RL: 0.01\n')
    with pytest.raises(KeyError, match=rf"config file '{bad}': SOLVER.BASE_RL is not a config key; did you mean SOLVER.BASE_LR"):
        load_config(str(bad))


def test_overrides_that_are_not_pairs_say_so():
    with pytest.raises(ValueError, match=r"not KEY VALUE pairs \(an odd count\).*flags go before the overrides"):
        load_config(STUDENT, ["SOLVER.MAX_ITER", 10, "MODEL.DEVICE"])


def test_flags_after_the_overrides_are_named_before_anything_runs():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", STUDENT,
                           "SOLVER.MAX_ITER", "10", "--num-gpus", "2", "--resume"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2  # argparse's usage error
    assert "['--num-gpus', '--resume'] come after the config overrides" in proc.stderr
    assert "put the flags before the overrides" in proc.stderr


def test_an_annotation_file_that_is_not_json_is_named(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    (tmp_path / "images").mkdir()
    load_config(STUDENT, ["DATASETS.COCO", [("broken_json_set", str(broken), str(tmp_path / "images"))]])
    with pytest.raises(ValueError, match=rf"dataset 'broken_json_set': {broken} is not valid JSON \(Expecting value: "):
        DatasetCatalog.get("broken_json_set")


def test_declared_datasets_that_the_run_does_not_use_are_named(tiny_digits):
    from d2_taskdistill.data.config_datasets import check_datasets

    json_path, image_root = tiny_digits
    cfg = load_config(STUDENT, ["DATASETS.COCO", [("declared_unused", json_path, image_root)],
                                "MODEL.RETINANET.NUM_CLASSES", 3])
    with pytest.raises(ValueError, match=r"DATASETS.COCO / DATASETS.VOC declare \['declared_unused'\], but the run uses "
                                         r"\['digits_det_train', 'digits_det_val'\].*DATASETS.TRAIN \"\('declared_unused',\)\""):
        check_datasets(cfg)
    # The trainer's data loader refuses it before it loads the config's own training set.
    from d2_taskdistill.engine import DistillTrainer

    with pytest.raises(ValueError, match=r"declare \['declared_unused'\], but the run uses"):
        DistillTrainer.build_train_loader(cfg)


def test_an_image_whose_size_disagrees_with_its_annotation_is_named_before_training(tiny_digits, tmp_path):
    import json

    json_path, image_root = tiny_digits
    coco = json.load(open(json_path))
    coco["images"][3]["width"] = 200
    wrong = tmp_path / "wrong_size.json"
    wrong.write_text(json.dumps(coco))
    load_config(STUDENT, ["DATASETS.COCO", [("wrong_size", str(wrong), image_root)], "DATASETS.CHECK_IMAGES", "all"])
    with pytest.raises(ValueError, match=rf"dataset 'wrong_size': image .*{coco['images'][3]['file_name']} is 128x128 but "
                                         r"its annotation says 200x128.*fix the annotation's width and height"):
        DatasetCatalog.get("wrong_size")


def test_checking_every_image_decodes_in_threads_and_reports_progress(tiny_digits, caplog):
    """DATASETS.CHECK_IMAGES all: a thread pool decodes, the log counts in tenths; the files of a
    dataset are checked once per process (the dataset check loads it again)."""
    import PIL.Image

    json_path, image_root = tiny_digits
    load_config(STUDENT, ["DATASETS.COCO", [("all_checked", json_path, image_root)], "DATASETS.CHECK_IMAGES", "all"])
    threads = set()
    real_open = PIL.Image.open

    def counted(*args, **kwargs):
        threads.add(threading.get_ident())
        return real_open(*args, **kwargs)

    with caplog.at_level("INFO", logger="d2_taskdistill"), mock.patch.object(PIL.Image, "open", counted):
        count = len(DatasetCatalog.get("all_checked"))
        decoded_once = set(threads)
        DatasetCatalog.get("all_checked")
    assert f"dataset 'all_checked': decoding its {count} images (DATASETS.CHECK_IMAGES 'all';" in caplog.text
    assert f"dataset 'all_checked': {count}/{count} images decoded" in caplog.text
    assert caplog.text.count("images decoded") == min(count, 10)
    assert threading.get_ident() not in decoded_once  # decoded by the pool's threads
    assert threads == decoded_once  # the second load decoded nothing


def test_a_training_set_without_annotations_says_what_to_check(tiny_digits, tmp_path):
    import json

    from d2_taskdistill.engine import DistillTrainer

    json_path, image_root = tiny_digits
    coco = json.load(open(json_path))
    coco["annotations"] = []
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(coco))
    cfg = load_config(STUDENT, ["DATASETS.COCO", [("bare_train", str(bare), image_root)], "DATASETS.TRAIN", "('bare_train',)",
                                "MODEL.DEVICE", "cpu"])
    with pytest.raises(ValueError, match=r"training datasets \['bare_train'\] have no image with an annotation"):
        DistillTrainer.build_train_loader(cfg)
    cfg.SOLVER.EPOCHS = 2
    with pytest.raises(ValueError, match=r"SOLVER.EPOCHS is set but the training set \(DATASETS.TRAIN\) has no image"):
        from d2_taskdistill.schedule import apply_epoch_schedule

        apply_epoch_schedule(cfg)


def test_a_student_alone_run_without_an_evaluation_is_named(tmp_path):
    from d2_taskdistill.hooks import final_ap

    with using_setting_names(YACS_SETTING_NAMES), pytest.raises(FileNotFoundError, match=r"DISTILL.STUDENT_ALONE_RUN=.*no metrics.json"):
        final_ap(str(tmp_path))
    (tmp_path / "metrics.json").write_text('{"iteration": 9, "total_loss": 1.0}\n')
    with using_setting_names(YACS_SETTING_NAMES), pytest.raises(ValueError, match=r"holds no evaluation \(bbox/AP\)"):
        final_ap(str(tmp_path))
    (tmp_path / "metrics.json").write_text('{"iteration": 9, "parts_val/bbox/AP": 31.5}\n')  # several test sets
    assert final_ap(str(tmp_path)) == 31.5


def test_yaml_files_are_read_without_running_python_tags(tmp_path):
    """A config file or a teacher run's config.yaml may come from anyone: a !!python tag in it is
    neither run nor built, where yaml.unsafe_load (detectron2's fallback) would run it."""
    from d2_taskdistill.config import is_lazy_config_file

    marker = tmp_path / "ran"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"SOLVER:\n  BASE_LR: {tag}\n")
    lazy = tmp_path / "lazy.yaml"
    lazy.write_text(f"model:\n  norm: {tag}\ntrain:\n  max_iter: 10\n")
    assert not is_lazy_config_file(str(plain)) and is_lazy_config_file(str(lazy))
    with pytest.raises(ValueError, match=r"config file '.*plain.yaml' \(or a _BASE_ of it\) holds a Python tag, "
                                         r"which this project does not run: a yacs config is plain yaml"):
        load_config(str(plain))
    assert not marker.exists()
    # detectron2's own model-zoo yaml, whose anchor sizes are a !!python/object/apply:eval, is installed
    # code: a config built on it loads.
    from detectron2 import model_zoo

    based = tmp_path / "based.yaml"
    based.write_text(f"_BASE_: {model_zoo.get_config_file('COCO-Detection/retinanet_R_101_FPN_3x.yaml')}\n"
                     "MODEL:\n  RETINANET:\n    NUM_CLASSES: 3\n")
    cfg = load_config(str(based))
    assert cfg.MODEL.RETINANET.NUM_CLASSES == 3 and cfg.MODEL.ANCHOR_GENERATOR.SIZES[0][0] == 32
