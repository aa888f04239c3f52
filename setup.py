from setuptools import find_packages, setup

setup(
    name="d2_taskdistill",
    version="0.1.0",
    description="Task-aware knowledge distillation (TID, TBD, BCKD) for Detectron2 dense detectors",
    packages=find_packages(include=["d2_taskdistill", "d2_taskdistill.*"]),
    python_requires=">=3.8",
    # torch, torchvision and detectron2 are installed separately (see README). Unpinned: the
    # project's own environment pins its versions in requirements.txt, a user's keeps theirs.
    install_requires=["numpy", "Pillow", "PyYAML", "fvcore", "pycocotools", "opencv-python-headless",
                      "scikit-learn", "matplotlib", "tabulate"],
)
