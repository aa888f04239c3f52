"""A user's own COCO data end to end: the teacher of a run named by its directory, a safe export,
errors in log.txt, unreadable images and unknown categories named, the port of a second run,
and the start-up warnings that are not the user's business."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from d2_taskdistill import load_config
from d2_taskdistill.data import generate_split
from d2_taskdistill.data.config_datasets import check_datasets, thing_classes
from d2_taskdistill.engine import FileNamingMapper
from d2_taskdistill.export import export_student
from d2_taskdistill.launch import free_dist_url, launch
from d2_taskdistill.modeling.teacher import build_teacher_origin
from conftest import ROOT, SMALL_TEACHER_OPTS, config_path, scratch_dir, tiny_run_opts

CLASSES = ["ring", "bolt", "nut"]


def write_three_class_set(root, name, num_images=6, seed=11):
    """A COCO json of generated images with 3 classes of our own (digits 0-2 renamed)."""
    json_path = generate_split(str(root), name, num_images=num_images, image_size=128, seed=seed)
    with open(json_path) as f:
        data = json.load(f)
    data["categories"] = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] <= 3]
    out = os.path.join(str(root), f"{name}_3cls.json")
    with open(out, "w") as f:
        json.dump(data, f)
    return out, os.path.join(str(root), name)


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_data")
    train = write_three_class_set(root, "train", seed=11)
    val = write_three_class_set(root, "val", num_images=4, seed=12)
    return [("parts_train", *train), ("parts_val", *val)]


def own_opts(own_data, output_dir):
    return [*tiny_run_opts(output_dir), "DATASETS.COCO", str([list(e) for e in own_data]),
            "DATASETS.TRAIN", "('parts_train',)", "DATASETS.TEST", "('parts_val',)",
            "MODEL.RETINANET.NUM_CLASSES", 3]


@pytest.fixture(scope="module")
def teacher_run(own_data, tmp_path_factory):
    """A finished teacher run directory as train_net.py leaves it: config.yaml, model_final.pth,
    last_checkpoint (weights random: only their shapes matter here)."""
    with scratch_dir(tmp_path_factory, "teacher_run") as run:
        cfg = load_config(config_path("digits", "retinanet_R34_FPN_teacher.yaml"),
                          [*own_opts(own_data, run), *SMALL_TEACHER_OPTS])
        with open(run / "config.yaml", "w") as f:
            f.write(cfg.dump())
        cfg.MODEL.DEVICE = "cpu"
        DetectionCheckpointer(build_model(cfg), save_dir=str(run)).save("model_final")
        yield run


def distill_opts(own_data, output_dir, teacher_opts):
    return [*own_opts(own_data, output_dir), "DISTILL.TEACHER.EVAL_AT_START", False, *teacher_opts]


def test_teacher_from_its_run_directory(own_data, teacher_run, tmp_path):
    cfg = load_config(config_path("digits", "retinanet_R34-R18_bckd_tid.yaml"),
                      distill_opts(own_data, tmp_path, ["DISTILL.TEACHER.RUN", str(teacher_run)]))
    teacher_origin = build_teacher_origin(cfg)
    assert teacher_origin.weights == str(teacher_run / "model_final.pth")
    assert teacher_origin.train_datasets == ["parts_train"]
    check_datasets(cfg, teacher_origin)  # the teacher's classes are the student's
    model = build_model(cfg)
    assert model.teacher.num_classes == 3 and model.student.num_classes == 3


def test_teacher_weights_alone_name_the_run_setting(own_data, teacher_run, tmp_path):
    # The distillation config's own teacher (digits, 10 classes) with 3-class weights.
    cfg = load_config(config_path("digits", "retinanet_R34-R18_bckd_tid.yaml"),
                      distill_opts(own_data, tmp_path, ["DISTILL.TEACHER.WEIGHTS", str(teacher_run / "model_final.pth"),
                                                        "DISTILL.TEACHER.OPTS", SMALL_TEACHER_OPTS]))
    with pytest.raises(KeyError, match=r"shape mismatches.*set DISTILL.TEACHER.RUN to that run's OUTPUT_DIR"):
        build_model(cfg)
    # With the class count fixed by hand, the class check names the fix that applies.
    cfg.defrost()
    cfg.DISTILL.TEACHER.OPTS = [*SMALL_TEACHER_OPTS, "MODEL.RETINANET.NUM_CLASSES", 3]
    with pytest.raises(ValueError, match=r"trains on 'digits_det_train'.*If the teacher was trained on 'parts_train'.*"
                                         r"DISTILL.TEACHER.RUN"):
        check_datasets(cfg, build_teacher_origin(cfg))


def test_teacher_run_directory_errors(own_data, teacher_run, tmp_path, caplog):
    from d2_taskdistill.modeling.teacher import run_files

    with pytest.raises(FileNotFoundError, match=r"DISTILL.TEACHER.RUN='.*nowhere': no config.yaml there"):
        run_files(str(tmp_path / "nowhere"), "DISTILL.TEACHER.RUN")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(teacher_run, unfinished)
    os.rename(unfinished / "model_final.pth", unfinished / "model_0000099.pth")
    (unfinished / "last_checkpoint").write_text("model_0000099.pth")
    with caplog.at_level("WARNING"):
        assert run_files(str(unfinished), "DISTILL.TEACHER.RUN")[1] == str(unfinished / "model_0000099.pth")
    assert "has not finished training: using its last checkpoint model_0000099.pth" in caplog.text
    (unfinished / "last_checkpoint").write_text("model_0000199.pth")
    with pytest.raises(FileNotFoundError, match="no checkpoint model_0000199.pth there"):
        run_files(str(unfinished), "DISTILL.TEACHER.RUN")


def test_export_refuses_weights_that_do_not_fit(own_data, teacher_run, tmp_path):
    run = tmp_path / "distill_run"
    opts = distill_opts(own_data, run, ["DISTILL.TEACHER.RUN", str(teacher_run)])
    cfg = load_config(config_path("digits", "retinanet_R34-R18_fitnet.yaml"), opts)
    os.makedirs(run)
    with open(run / "config.yaml", "w") as f:
        f.write(cfg.dump())
    DetectionCheckpointer(build_model(cfg), save_dir=str(run)).save("model_final")
    (run / "last_checkpoint").write_text("model_final.pth")

    # The repository's digits config (10 classes) with the 3-class run: refused, nothing written.
    digits_cfg = load_config(config_path("digits", "retinanet_R34-R18_fitnet.yaml"))
    with pytest.raises(ValueError, match=r"do not fit the config being exported \(RetinaNet, "
                                         r"MODEL.RETINANET.NUM_CLASSES=10\): shape mismatches.*--run"):
        export_student(digits_cfg, str(run / "model_final.pth"), str(tmp_path / "wrong"))
    assert not (tmp_path / "wrong").exists()  # the folder it would have created, with nothing in it

    # The command line with --run takes the run's own config: 3 classes, their names.
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "tools/export_student.py", "--run", str(run), "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(out / "metadata.json"))["thing_classes"] == CLASSES
    assert "NUM_CLASSES: 3" in (out / "config.yaml").read_text()
    exported = {name: (out / name).read_bytes() for name in os.listdir(out)}
    # A failed export into the same folder leaves the previous export as it was.
    proc = subprocess.run([sys.executable, "tools/export_student.py", "--config-file",
                           config_path("digits", "retinanet_R34-R18_fitnet.yaml"), "--weights",
                           str(run / "model_final.pth"), "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "do not fit the config being exported" in proc.stderr
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == exported


def test_an_error_that_stops_training_is_in_log_txt(own_data, tmp_path):
    # A test set without annotations: a clear error, in log.txt as well as on the console.
    empty = tmp_path / "empty.json"
    data = json.load(open(own_data[1][1]))
    data["annotations"] = []
    empty.write_text(json.dumps(data))
    declared = [list(own_data[0]), ["parts_unlabelled", str(empty), own_data[1][2]]]
    out = tmp_path / "run"
    args = ["--config-file", config_path("digits", "retinanet_R18_FPN_student.yaml"),
            *[str(o) for o in tiny_run_opts(out)], "DATASETS.COCO", str(declared),
            "DATASETS.TRAIN", "('parts_train',)", "DATASETS.TEST", "('parts_unlabelled',)",
            "MODEL.RETINANET.NUM_CLASSES", "3"]
    proc = subprocess.run([sys.executable, "train_net.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    message = "dataset 'parts_unlabelled' (DATASETS.TEST) has no annotations: AP cannot be computed"
    # Once on the console: the raise's traceback. detectron2's train loop's record of it and the
    # project's own line go to log.txt only.
    console = proc.stdout + proc.stderr
    assert console.count(message) == 1 and "Exception during training" not in console, console[-3000:]
    assert "Training stopped" not in console
    log = (out / "log.txt").read_text()
    assert "Training stopped: ValueError: " + message in log and "Exception during training:" in log


def _truncated_copy(src, dst):
    """A JPEG cut in half: its header reads, its pixels do not."""
    from PIL import Image

    Image.open(src).convert("RGB").save(dst, quality=95)
    data = open(dst, "rb").read()
    open(dst, "wb").write(data[: len(data) // 2])


def test_unreadable_images_and_unknown_categories_are_named(own_data, tmp_path):
    json_path, image_root = own_data[0][1], own_data[0][2]
    data = json.load(open(json_path))
    images = tmp_path / "images"
    shutil.copytree(image_root, images)
    bad = data["images"][1]
    _truncated_copy(images / bad["file_name"], images / "broken.jpg")
    bad["file_name"] = "broken.jpg"
    broken_json = tmp_path / "broken.json"
    broken_json.write_text(json.dumps(data))

    def dataset(name, check, json_file=broken_json):
        cfg = load_config(config_path("digits", "retinanet_R18_FPN_student.yaml"),
                          ["DATASETS.COCO", str([[name, str(json_file), str(images)]]), "DATASETS.CHECK_IMAGES", check])
        return cfg, name

    # Up front, where the dataset checks look at the files (6 images: the sample is all of them).
    _, name = dataset("broken_sample", "sample")
    with pytest.raises(ValueError, match=r"dataset 'broken_sample': image .*broken.jpg cannot be read "
                                         r"\(OSError: image file is truncated"):
        DatasetCatalog.get(name)
    # Unchecked ("none"), the loader's mapper names the file when it meets it.
    cfg, name = dataset("broken_unchecked", "none")
    record = next(r for r in DatasetCatalog.get(name) if r["file_name"].endswith("broken.jpg"))
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (128,), 128
    with pytest.raises(OSError, match=r"(?s)image file is truncated.*\[image .*broken.jpg: fix or remove it"):
        FileNamingMapper(cfg, is_train=True)(record)
    with pytest.raises(ValueError, match="DATASETS.CHECK_IMAGES='every'"):
        dataset("broken_typo", "every")

    # An annotation whose category is not declared: dataset and annotation named.
    data["annotations"][2]["category_id"] = 99
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps(data))
    _, name = dataset("unknown_category", "none", unknown)
    with pytest.raises(ValueError, match=r"dataset 'unknown_category' .*1 annotations have a category_id that "
                                         rf"is not in its 'categories' \[1, 2, 3\].*\({data['annotations'][2]['id']}, 99\)"):
        DatasetCatalog.get(name)


def _occupied_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, sock.getsockname()[1]


def test_busy_default_port_is_replaced_and_a_busy_explicit_one_named(tmp_path):
    sock, port = _occupied_port()
    with sock:
        default = f"tcp://127.0.0.1:{port}"
        assert free_dist_url(default, default, 2, 1) == "auto"  # the user's second run on one machine
        assert free_dist_url(default, default, 1, 1) == default  # one process: no rendezvous
        assert free_dist_url(default, default, 2, 2) == default  # several machines: their address
        with pytest.raises(RuntimeError, match=rf"--dist-url tcp://127.0.0.1:{port}: its port is in use.*Give every "
                                               r"machine the same --dist-url"):
            launch(_noop, 1, num_machines=2, machine_rank=0, dist_url=default, device="cpu")
    assert free_dist_url(default, default, 2, 1) == default  # free again


def _noop():
    pass


def test_start_up_warnings_that_are_not_the_users_are_quiet():
    code = ("import logging, warnings, torch\n"
            "import d2_taskdistill\n"
            "from detectron2.modeling.anchor_generator import DefaultAnchorGenerator\n"
            "DefaultAnchorGenerator(sizes=[[32]], aspect_ratios=[[1.0]], strides=[8])([torch.zeros(1, 1, 4, 4)])\n"
            "logging.basicConfig()\n"
            "logging.getLogger('torch.utils.cpp_extension').warning(\"No CUDA runtime is found, using CUDA_HOME='x'\")\n"
            "warnings.warn('a warning of the user')\n")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for quiet in ("torch.jit.script", "torch.meshgrid", "No CUDA runtime"):
        assert quiet not in proc.stderr
    assert "UserWarning: a warning of the user" in proc.stderr


def test_a_py_config_declares_own_data_in_its_train_keys(own_data, tmp_path):
    """train.coco_datasets, as DATASETS.COCO: registered by load_lazy_config (so in every worker)
    and kept in the run's config.yaml, which then loads with its datasets."""
    from detectron2.data import MetadataCatalog
    from detectron2.config import LazyConfig

    from d2_taskdistill.lazy_engine import load_lazy_config, save_portable

    declared = ",".join(f"['{name}','{json_file}','{root}']" for name, json_file, root in own_data)
    cfg = load_lazy_config(config_path("digits", "retinanet_R18_FPN_student.py"), [
        f"train.coco_datasets=[{declared}]", "dataloader.train.dataset.names=[parts_train]",
        "dataloader.test.dataset.names=[parts_val]", "dataloader.evaluator.dataset_name=parts_val",
        "model.num_classes=3", "train.device=cpu"])
    assert thing_classes("parts_val") == CLASSES and MetadataCatalog.get("parts_val").evaluator_type == "coco"
    save_portable(cfg, str(tmp_path / "config.yaml"))
    saved = LazyConfig.load(str(tmp_path / "config.yaml"))
    assert [list(e) for e in saved.train.coco_datasets] == [list(e) for e in own_data]
    assert load_lazy_config(str(tmp_path / "config.yaml")).model.num_classes == 3  # the same entries: no clash
    with pytest.raises(ValueError, match=r"train.coco_datasets entry \['x'\]: expected \[name, json_file, image_root\]"):
        load_lazy_config(config_path("digits", "retinanet_R18_FPN_student.py"), ["train.coco_datasets=[[x]]"])
    with pytest.raises(ValueError, match=r"train.check_images='every'; choose one of"):
        load_lazy_config(config_path("digits", "retinanet_R18_FPN_student.py"), ["train.check_images=every"])
