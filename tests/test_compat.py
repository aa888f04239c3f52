"""The compat layer works only where detectron2's C++ ops are missing."""
import os
import subprocess
import sys
import textwrap

# Makes `import detectron2._C` fail, as on a build without C++ ops.
HIDE_C = """
import sys
class HideC:
    def find_spec(self, name, path=None, target=None):
        if name == "detectron2._C":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, HideC())
"""

# A stand-in for a compiled detectron2._C, as on an upstream build.
FAKE_C = """
import sys, types
sys.modules["detectron2._C"] = types.ModuleType("detectron2._C", doc="compiled ops")
"""

REPORT = """
import d2_taskdistill
from d2_taskdistill import compat
from pycocotools.cocoeval import COCOeval
from detectron2.evaluation import coco_evaluation
print(compat.HAS_CPP_OPS)
print(sys.modules["detectron2._C"].__doc__)
print(coco_evaluation.COCOeval_opt is COCOeval)
"""


def run(prelude):
    code = textwrap.dedent(prelude) + textwrap.dedent(REPORT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-3:]


def test_noop_when_compiled_ops_exist():
    has_ops, c_doc, official_cocoeval = run(FAKE_C)
    assert has_ops == "True"
    assert c_doc == "compiled ops"  # left alone
    assert official_cocoeval == "False"  # the fast evaluator stays


def test_fallbacks_when_compiled_ops_missing():
    has_ops, c_doc, official_cocoeval = run(HIDE_C)
    assert has_ops == "False"
    assert "Stub installed by d2_taskdistill.compat" in c_doc
    assert official_cocoeval == "True"


def test_detectron2_kind_features():
    """Feature checks agree with each other, and with the environment make built."""
    import d2_taskdistill  # noqa: F401
    from d2_taskdistill import compat

    upstream_features = (compat.launch_supports_cpu_workers(), compat.fcos_labels_images_without_boxes())
    assert upstream_features in {(True, True), (False, False)}  # both arrived after v0.6
    expected = os.environ.get("D2_TASKDISTILL_EXPECT_DETECTRON2", "")
    if expected == "upstream":
        assert compat.HAS_CPP_OPS and upstream_features == (True, True)
    elif expected == "registry-v0.6":
        assert not compat.HAS_CPP_OPS and upstream_features == (False, False)
    else:
        assert expected == "", f"D2_TASKDISTILL_EXPECT_DETECTRON2={expected!r}: 'upstream' or 'registry-v0.6'"


def test_pillow_linear_alias_for_v06_transforms():
    import d2_taskdistill  # noqa: F401
    from PIL import Image

    from detectron2.data.transforms import ExtentTransform

    assert Image.LINEAR == Image.BILINEAR
    # v0.6 takes Image.LINEAR as ExtentTransform's default; upstream Image.BILINEAR: the same filter.
    assert ExtentTransform((0, 0, 4, 4), (4, 4)).interp == Image.BILINEAR
