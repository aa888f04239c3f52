# `make setup` builds .venv from nothing; a second run does no work.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-complete
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Accuracy-table runs trained at the same time (one thread each on this 2-core machine).
BENCH_JOBS ?= 2

.PHONY: setup test demo bench-accuracy bench-speed clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt setup.py tools/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# pip<26: newer pip refuses the registry copy of detectron2 (see tools/install_detectron2.py).
	$(PY) -m pip install -q "pip<26" wheel
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import d2_taskdistill, detectron2; print('detectron2', detectron2.__version__, 'ready')"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) tools/demo.py

bench-accuracy: setup
	$(PY) tools/bench_accuracy.py --jobs $(BENCH_JOBS)

bench-speed: setup
	$(PY) tools/bench_speed.py

clean-venv:
	rm -rf $(VENV)
