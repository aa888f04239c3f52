"""A small real detection dataset made from scikit-learn's handwritten digits.

The 1,797 8x8 digit images bundled with scikit-learn (no download) are pasted
at varied scales onto crops of scikit-learn's bundled sample photos, with
clutter strokes that are not objects. Generation is deterministic: the same
seed gives the same bytes. Digit instances are split disjointly between the
train and val splits. A third split, tune, draws new images from the train
split's digit instances: it is where open choices are compared, so that val
stays untouched by model selection.
"""
import contextlib
import json
import os
import shutil
import tempfile

import cv2
import numpy as np

CLASS_NAMES = [str(d) for d in range(10)]
# Bump when the generated data changes, so that cached splits are written again. 3: instance masks
# (COCO RLE) beside the same images and boxes as 2.
GENERATOR_VERSION = 3
DEFAULT_ROOT_ENV = "D2_TASKDISTILL_DATA"
_VAL_FRACTION = 0.2
# Digit side in pixels (the stroke box is a little smaller) and how often each range is drawn.
_SIDE_RANGES = [(8, 36), (36, 100), (112, 124)]
_SIDE_PROBS = [0.5, 0.38, 0.12]
_SPLIT_SEED = 1234
# Offsets of each split's image random stream, so that no two splits draw the same images.
_SPLIT_STREAMS = {"train": 0, "val": 10_000, "tune": 20_000}


def default_root():
    """Cache directory of generated datasets (``$D2_TASKDISTILL_DATA`` or ~/.cache)."""
    return os.environ.get(
        DEFAULT_ROOT_ENV, os.path.join(os.path.expanduser("~"), ".cache", "d2_taskdistill")
    )


def digit_indices(split, num_digits=1797):
    """Indices into scikit-learn's digits used by ``split``; val is disjoint from train and tune."""
    order = np.random.RandomState(_SPLIT_SEED).permutation(num_digits)
    num_val = int(round(num_digits * _VAL_FRACTION))
    return order[:num_val] if split == "val" else order[num_val:]


def _digit_pool(split):
    from sklearn.datasets import load_digits

    digits = load_digits()
    indices = digit_indices(split, len(digits.target))
    return digits.images[indices] / 16.0, digits.target[indices]


def _backgrounds():
    from sklearn.datasets import load_sample_images

    return [img[:, :, ::-1] for img in load_sample_images().images]  # RGB -> BGR


def _iou(box, boxes):
    if len(boxes) == 0:
        return np.zeros(0)
    boxes = np.asarray(boxes, dtype=np.float64)
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def _render_image(rng, image_size, digits, labels, backgrounds, max_objects):
    bg = backgrounds[rng.randint(len(backgrounds))]
    crop = rng.randint(image_size // 2, min(bg.shape[:2]) + 1)
    y, x = rng.randint(bg.shape[0] - crop + 1), rng.randint(bg.shape[1] - crop + 1)
    canvas = cv2.resize(bg[y : y + crop, x : x + crop], (image_size, image_size))
    canvas = canvas.astype(np.float32) * rng.uniform(0.35, 0.6)

    # Clutter: strokes that look like pen marks but are not digits.
    for _ in range(rng.randint(0, 4)):
        p0 = tuple(int(v) for v in rng.randint(0, image_size, 2))
        p1 = tuple(int(v) for v in rng.randint(0, image_size, 2))
        color = tuple(float(c) for c in rng.uniform(150, 255, 3))
        cv2.line(canvas, p0, p1, color, int(rng.randint(1, 3)))

    annotations = []
    boxes = []
    for _ in range(rng.randint(1, max_objects + 1)):
        # Side ranges chosen so that COCO's small, medium and large boxes all occur.
        low, high = (min(s, image_size) for s in _SIDE_RANGES[rng.choice(len(_SIDE_RANGES), p=_SIDE_PROBS)])
        side = int(round(np.exp(rng.uniform(np.log(low), np.log(high)))))
        x0, y0 = rng.randint(0, image_size - side + 1, 2)
        index = rng.randint(len(labels))
        alpha = cv2.resize(digits[index].astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
        ys, xs = np.nonzero(alpha > 0.15)
        if len(xs) == 0:
            continue
        box = [x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1]
        if len(boxes) and _iou(box, boxes).max() > 0.3:  # some overlap, never hidden
            continue
        color = rng.uniform(170, 255, 3).astype(np.float32)
        region = canvas[y0 : y0 + side, x0 : x0 + side]
        region[:] = region * (1 - alpha[..., None]) + color * alpha[..., None]
        boxes.append(box)
        annotations.append((box, int(labels[index]), (x0, y0, alpha > 0.15)))
    return np.clip(canvas, 0, 255).astype(np.uint8), annotations


def instance_mask_rle(image_size, x0, y0, pixels):
    """The digit's own pixels (where its alpha exceeds the box's threshold) as COCO compressed RLE.
    The mask's extent is the box; later digits drawn over it (IoU <= 0.3) are not cut out."""
    from pycocotools import mask as mask_util

    mask = np.zeros((image_size, image_size), dtype=np.uint8)
    mask[y0 : y0 + pixels.shape[0], x0 : x0 + pixels.shape[1]] = pixels
    rle = mask_util.encode(np.asfortranarray(mask))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@contextlib.contextmanager
def _exclusive(root, name):
    """One process at a time in ``root`` (the workers of a first multi-process run all generate):
    an advisory lock on ``root/.<name>.lock``; the others wait, then find the files written."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{name}.lock"), "a") as lock:
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): the unique temporary names below still hold
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replace_with(path, write, suffix=".tmp"):
    """``write(temporary path)``, then rename it to ``path``: readers never see a partial file, and
    writers never share a temporary name."""
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.",
                                         suffix=suffix)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _write_text(path, text):
    def write(temporary):
        with open(temporary, "w") as f:
            f.write(text)

    _replace_with(path, write)


def _is_generated(json_path, params):
    if not os.path.exists(json_path):
        return False
    with open(json_path) as f:
        return json.load(f).get("info", {}).get("params") == params


def generate_split(root, split, num_images, image_size=128, max_objects=6, seed=0):
    """Write ``root/<split>/*.png`` and ``root/<split>.json`` (COCO format).

    Returns the json path. Existing output with the same parameters is reused. Processes that
    call this at once (a first multi-process run) write it once: the first, the others wait.
    """
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}")
    json_path = os.path.join(root, f"{split}.json")
    params = dict(num_images=num_images, image_size=image_size, max_objects=max_objects, seed=seed,
                  generator=GENERATOR_VERSION)
    if _is_generated(json_path, params):
        return json_path
    with _exclusive(root, split):
        if not _is_generated(json_path, params):  # not written meanwhile by another process
            _generate_split(root, split, json_path, params)
    return json_path


def _generate_split(root, split, json_path, params):
    num_images, image_size, max_objects, seed = (params[k] for k in ("num_images", "image_size", "max_objects", "seed"))
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    digits, labels = _digit_pool(split)
    backgrounds = _backgrounds()
    rng = np.random.RandomState(seed + _SPLIT_STREAMS[split])
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image, objects = _render_image(rng, image_size, digits, labels, backgrounds, max_objects)
        file_name = f"{image_id:06d}.png"
        path = os.path.join(image_dir, file_name)
        _replace_with(path, lambda temporary: cv2.imwrite(temporary, image), suffix=".png")
        images.append(dict(id=image_id, file_name=file_name, width=image_size, height=image_size))
        for box, label, (x0, y0, pixels) in objects:
            w, h = box[2] - box[0], box[3] - box[1]
            # area stays the box's: COCO's small/medium/large ranges, and the recorded APs, use it.
            annotations.append(
                dict(id=len(annotations) + 1, image_id=image_id, category_id=label + 1,
                     bbox=[int(box[0]), int(box[1]), int(w), int(h)], area=int(w * h), iscrowd=0,
                     segmentation=instance_mask_rle(image_size, x0, y0, pixels))
            )
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CLASS_NAMES)]
    coco = dict(info=dict(description="d2_taskdistill digits", params=params),
                images=images, annotations=annotations, categories=categories)
    _write_text(json_path, json.dumps(coco))


def write_voc_split(root, split):
    """Write the COCO split of ``root`` again in Pascal VOC layout under ``root/voc``.

    Images are the same bytes (hard links where possible), named ``.jpg`` as
    detectron2's VOC loader expects (it reads them by content). Returns the VOC
    directory. One process at a time; each file is replaced whole, for the readers.
    """
    with _exclusive(root, f"voc_{split}"):
        return _write_voc_split(root, split)


def _write_voc_split(root, split):
    from xml.sax.saxutils import escape

    json_path = os.path.join(root, f"{split}.json")
    with open(json_path) as f:
        coco = json.load(f)
    voc = os.path.join(root, "voc")
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc, sub), exist_ok=True)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    objects = {}
    for ann in coco["annotations"]:
        objects.setdefault(ann["image_id"], []).append(ann)
    file_ids = []
    for image in coco["images"]:
        file_id = f"{split}_{image['id']:06d}"
        file_ids.append(file_id)
        src = os.path.join(root, split, image["file_name"])
        dst = os.path.join(voc, "JPEGImages", file_id + ".jpg")
        if not os.path.exists(dst):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        xml = [f"<annotation><filename>{file_id}.jpg</filename><size><width>{image['width']}</width>"
               f"<height>{image['height']}</height><depth>3</depth></size>"]
        for ann in objects.get(image["id"], []):
            x, y, w, h = ann["bbox"]
            # VOC boxes are 1-based and inclusive; detectron2's loader subtracts 1 from xmin/ymin.
            xml.append(f"<object><name>{escape(names[ann['category_id']])}</name><pose>Unspecified</pose>"
                       f"<truncated>0</truncated><difficult>0</difficult>"
                       f"<bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax>"
                       f"<ymax>{y + h}</ymax></bndbox></object>")
        xml.append("</annotation>")
        _write_text(os.path.join(voc, "Annotations", file_id + ".xml"), "".join(xml))
    _write_text(os.path.join(voc, "ImageSets", "Main", f"{split}.txt"), "\n".join(file_ids) + "\n")
    return voc
