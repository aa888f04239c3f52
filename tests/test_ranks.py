"""What the ranks of a multi-process run must agree on, checked where they would otherwise go
their own ways on a cluster: the teacher file, the checkpoint they resume from, a teacher run
read while it still writes, the dataset check (rank 0 decodes, the others take its verdict), and
the embedded data that every worker of a first run generates."""
import json
import multiprocessing
import os

import pytest
import torch

import d2_taskdistill  # noqa: F401  (first: spawned workers import this module afresh)
from d2_taskdistill.data import generate_split, write_voc_split
from d2_taskdistill.launch import launch
from conftest import make_teacher_checkpoint


def _outcome(check):
    try:
        return {"ok": check()}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _disagreeing_ranks(root):
    """A launch worker: each check with inputs that differ by rank; writes what each check gave."""
    import PIL.Image
    from detectron2.data import DatasetCatalog
    from detectron2.utils import comm

    from d2_taskdistill.checkpoint import SafeCheckpointer, TeacherIdentity, check_resume_agreement
    from d2_taskdistill.data.config_datasets import register_declared_datasets
    from d2_taskdistill.hooks import DatasetCheck, check_same_teacher_on_all_ranks
    from d2_taskdistill.modeling import teacher

    rank = comm.get_rank()
    results = {}
    # Each machine has its own copy of the teacher file; rank 1's is another version.
    results["teacher"] = _outcome(lambda: check_same_teacher_on_all_ranks(
        TeacherIdentity(os.path.join(root, "teacher_rank0.pth" if rank == 0 else "teacher_rank1.pth"))))
    # The same file everywhere: no error.
    results["same_teacher"] = _outcome(lambda: check_same_teacher_on_all_ranks(
        TeacherIdentity(os.path.join(root, "teacher_rank0.pth"))))
    # OUTPUT_DIR not shared: rank 0's folder has a checkpoint, rank 1's (its own disk) none.
    model = torch.nn.Linear(2, 2)
    checkpointer = SafeCheckpointer(model, os.path.join(root, f"output_rank{rank}"))
    checkpointer.resume_or_load("", resume=True)
    start_iter = 5 if checkpointer.has_checkpoint() else 0
    results["resume"] = _outcome(lambda: check_resume_agreement(checkpointer, True, start_iter, "OUTPUT_DIR"))
    # A teacher run that writes its next checkpoint while the ranks read last_checkpoint: rank 1
    # would read the new name; every rank uses rank 0's.
    if rank == 1:
        teacher._last_checkpoint_name = lambda run_dir: "model_0000099.pth"
    results["teacher_run"] = _outcome(lambda: os.path.basename(teacher.run_files(os.path.join(root, "teacher_run"))[1]))
    # A truncated image: rank 0 decodes and finds it, rank 1 decodes nothing and takes its verdict.
    decoded = []
    real_open = PIL.Image.open
    PIL.Image.open = lambda path, *a, **k: decoded.append(path) or real_open(path, *a, **k)
    register_declared_datasets(coco=[["ranks_data", os.path.join(root, "data", "train.json"),
                                      os.path.join(root, "data", "train")]], image_check="all")
    results["load"] = _outcome(lambda: len(DatasetCatalog.get("ranks_data")))
    results["check"] = _outcome(lambda: DatasetCheck(lambda: DatasetCatalog.get("ranks_data")).before_train())
    results["decoded"] = len(decoded)
    with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def test_ranks_that_disagree_are_named_on_every_rank(tiny_batch, tmp_path):
    make_teacher_checkpoint("retinanet", str(tmp_path / "teacher_rank0.pth"), tiny_batch[:2])
    (tmp_path / "teacher_rank1.pth").write_bytes((tmp_path / "teacher_rank0.pth").read_bytes()[:-8] + b"older ve")
    _saved_checkpoint(tmp_path / "output_rank0")
    run = tmp_path / "teacher_run"
    run.mkdir()
    (run / "config.yaml").write_text("MODEL: {}\n")
    (run / "model_0000049.pth").write_bytes(b"checkpoint 49")
    (run / "last_checkpoint").write_text("model_0000049.pth")
    generate_split(str(tmp_path / "data"), "train", num_images=6, image_size=64, seed=3)
    broken = tmp_path / "data" / "train" / "000004.png"
    broken.write_bytes(broken.read_bytes()[:200])

    launch(_disagreeing_ranks, 2, dist_url="auto", args=(str(tmp_path),), device="cpu")

    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for r in ranks:
        assert r["teacher"]["error"].startswith("ValueError: The ranks load different teacher files: ranks [1] "
                                                "differ from rank 0 (rank 0: ")
        assert "teacher_rank1.pth (sha256 " in r["teacher"]["error"]
        assert r["same_teacher"] == {"ok": None}
        assert r["resume"]["error"].startswith("RuntimeError: Ranks [1] found no checkpoint in ")
        assert ("where rank 0 resumes from model_0000005.pth (iteration 5): OUTPUT_DIR must be one folder that "
                "every machine sees") in r["resume"]["error"]
        assert r["teacher_run"] == {"ok": "model_0000049.pth"}
    assert ranks[0]["load"]["error"].startswith("ValueError: dataset 'ranks_data': image ")
    assert "000004.png cannot be read" in ranks[0]["load"]["error"]
    assert ranks[1]["load"] == {"ok": 6}  # rank 1 checked no file: rank 0 did
    assert ranks[0]["check"]["error"] == ranks[0]["load"]["error"]
    assert ranks[1]["check"]["error"].startswith("RuntimeError: rank 0 failed (ValueError: dataset 'ranks_data': "
                                                 "image ")
    assert ranks[0]["decoded"] >= 5 and ranks[1]["decoded"] == 0


def _saved_checkpoint(folder):
    from d2_taskdistill.checkpoint import SafeCheckpointer

    folder.mkdir()
    SafeCheckpointer(torch.nn.Linear(2, 2), str(folder)).save("model_0000005", iteration=5)


def _generate(root, barrier):
    from sklearn.datasets import load_digits, load_sample_images

    load_digits(), load_sample_images()  # what the generator reads first, read before all start at once
    barrier.wait()
    generate_split(root, "train", num_images=24, image_size=64, seed=9)
    write_voc_split(root, "train")


def test_workers_generating_the_embedded_data_at_once_write_it_once(tmp_path):
    """A first `--num-gpus 4` run: four workers load the digits data at the same moment, on an
    empty folder. One writes it, the others wait and find it; no temporary file is left."""
    import cv2
    import xml.etree.ElementTree as ET

    root = str(tmp_path / "digits")
    context = multiprocessing.get_context("spawn")  # as launch() starts workers; fork could inherit cv2's held locks
    barrier = context.Barrier(4)
    workers = [context.Process(target=_generate, args=(root, barrier)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    coco = json.load(open(os.path.join(root, "train.json")))
    assert len(coco["images"]) == 24
    for image in coco["images"]:
        assert cv2.imread(os.path.join(root, "train", image["file_name"])).shape == (64, 64, 3)
    voc_ids = open(os.path.join(root, "voc", "ImageSets", "Main", "train.txt")).read().split()
    assert len(voc_ids) == 24
    for file_id in voc_ids:
        ET.parse(os.path.join(root, "voc", "Annotations", file_id + ".xml"))
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                 if "tmp" in f or f.endswith(".png") and d.endswith("train") and not f[:6].isdigit()]
    assert leftovers == []
    # The same call again reads what is there (same parameters), as later runs do.
    before = os.path.getmtime(os.path.join(root, "train.json"))
    generate_split(root, "train", num_images=24, image_size=64, seed=9)
    assert os.path.getmtime(os.path.join(root, "train.json")) == before


@pytest.mark.parametrize("where", ["yacs", "lazy"])
def test_a_pinned_teacher_hash_refuses_another_file(teachers, tiny_dataset, tmp_path, where):
    from d2_taskdistill.checkpoint import file_sha256
    from conftest import distill_cfg

    teacher = teachers["retinanet"]
    sha256 = file_sha256(teacher)
    wrong = ("0" if sha256[0] != "0" else "1") + sha256[1:12]
    if where == "yacs":
        from d2_taskdistill.engine import DistillTrainer

        def build(pin):
            return DistillTrainer(distill_cfg("retinanet_R34-R18_fitnet.yaml", teacher, tmp_path / pin,
                                              opts=["DISTILL.TEACHER.SHA256", pin]))
        name = "DISTILL.TEACHER.SHA256"
    else:
        from d2_taskdistill.lazy_engine import LazyDistillTrainer
        from conftest import lazy_cfg

        def build(pin):
            return LazyDistillTrainer(lazy_cfg("retinanet_R34-R18_fitnet.py", teacher, tmp_path / pin,
                                               overrides=[f"model.teacher.sha256='{pin}'"]))
        name = r"load_teacher\(sha256=...\)"
    with pytest.raises(ValueError, match=rf"Teacher weights .* have sha256 {sha256}, not the {name}='{wrong}' "
                                         "this run expects: the file was replaced"):
        build(wrong)
    with pytest.raises(ValueError, match=rf"{name}='abc': give the teacher file's sha256"):
        build("abc")
    assert build(sha256[:12]).features.teacher_identity.sha256 == sha256
