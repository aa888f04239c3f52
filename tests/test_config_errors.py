"""The likeliest mistakes with a yaml config get a message that names the fix."""
import os
import subprocess
import sys

import pytest

from detectron2.data import DatasetCatalog

from d2_taskdistill import load_config
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
