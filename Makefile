# `make setup` builds .venv from nothing; a second run does no work.
# `make test` runs on the registry's detectron2 v0.6 (.venv), `make test-upstream` on
# upstream detectron2 main built from source (.venv-upstream).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-complete
UPSTREAM_VENV := .venv-upstream
UPSTREAM_PY := $(UPSTREAM_VENV)/bin/python
UPSTREAM_STAMP := $(UPSTREAM_VENV)/.setup-complete
# Where upstream detectron2 comes from: a source dir, a source archive or a pip URL.
# Default: the archive of upstream main in ../shared/vendor, when it exists.
D2_TASKDISTILL_DETECTRON2_SOURCE ?= $(firstword $(wildcard $(CURDIR)/../shared/vendor/detectron2-main-*.tar.gz))
export D2_TASKDISTILL_DETECTRON2_SOURCE
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# The suite's processes (pytest-xdist), one torch thread each; a test that runs past
# TEST_TIMEOUT seconds fails (pytest-timeout) instead of hanging the run.
TEST_WORKERS ?= 2
TEST_TIMEOUT ?= 900
PYTEST = D2_TASKDISTILL_TEST_THREADS=1 $(1) -m pytest -q -n $(TEST_WORKERS) --timeout $(TEST_TIMEOUT) tests
# Accuracy-table runs trained at the same time (one thread each on this 2-core machine).
BENCH_JOBS ?= 2

# The offline GPU check (docs/development.md, "Checking on a GPU"): its bundle, built here, travels with the tree.
GPU_BUNDLE ?= gpu_bundle
GPU_TWIN_OUT ?= output/gpu_twin
# Which detectron2 sources the twin checks (the check itself builds upstream, v0.6 where that fails).
GPU_TWIN_DETECTRON2 ?= upstream registry
# Which of them also run the complete suite in the twin. v0.6's suite is `make test`'s, on the
# same code: in the twin it checks its install from the bundle and parts a-b (saves .ci/run ~5 min).
# Before a GPU run: make gpu-twin GPU_TWIN_SUITE_ON="upstream registry".
GPU_TWIN_SUITE_ON ?= upstream

.PHONY: setup setup-upstream test test-upstream demo demo-screenshot bench-accuracy bench-speed clean-venv gpu-bundle gpu-twin

setup: $(STAMP)

# One recipe for both environments: $(1) venv, $(2) detectron2 source ("" = registry v0.6).
define build_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	# pip<26: newer pip refuses the registry copy of detectron2 (see tools/install_detectron2.py).
	$(1)/bin/python -m pip install -q "pip<26" wheel
	$(1)/bin/python -m pip install -q $(TORCH_PINS)
	$(1)/bin/python -m pip install -q -r requirements.txt
	D2_TASKDISTILL_DETECTRON2_SOURCE="$(2)" $(1)/bin/python tools/install_detectron2.py
	$(1)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(1)/bin/python -c "import d2_taskdistill, detectron2; from d2_taskdistill import compat; print('detectron2', detectron2.__file__, 'C++ ops:', compat.HAS_CPP_OPS)"
	touch $(1)/.setup-complete
endef

$(STAMP): requirements.txt setup.py tools/install_detectron2.py
	$(call build_venv,$(VENV),)

setup-upstream: $(UPSTREAM_STAMP)

$(UPSTREAM_STAMP): requirements.txt setup.py tools/install_detectron2.py
	@test -n "$(D2_TASKDISTILL_DETECTRON2_SOURCE)" || { echo "make setup-upstream: set D2_TASKDISTILL_DETECTRON2_SOURCE to upstream detectron2 (a source dir, archive or pip URL)"; exit 2; }
	$(call build_venv,$(UPSTREAM_VENV),$(D2_TASKDISTILL_DETECTRON2_SOURCE))

# The expectation makes tests/test_compat.py check that each venv holds the detectron2 it should.
test: setup
	D2_TASKDISTILL_EXPECT_DETECTRON2=registry-v0.6 $(call PYTEST,$(PY))

# Also builds .venv: tests/test_cross_version.py moves checkpoints between the two.
test-upstream: setup setup-upstream
	D2_TASKDISTILL_EXPECT_DETECTRON2=upstream D2_TASKDISTILL_OTHER_PYTHON=$(CURDIR)/$(PY) \
		$(call PYTEST,$(UPSTREAM_PY))

demo: setup
	$(PY) tools/demo.py

# The demo's report.html as a person's browser shows it (Debian: apt-get install chromium-headless-shell).
CHROMIUM ?= $(firstword $(shell command -v chromium-headless-shell chromium 2>/dev/null))
demo-screenshot:
	@test -n "$(CHROMIUM)" || { echo "make demo-screenshot: needs chromium-headless-shell or chromium (Debian: apt-get install chromium-headless-shell)"; exit 2; }
	@test -f output/demo/report.html || { echo "make demo-screenshot: no output/demo/report.html; run make demo first"; exit 2; }
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,3600 \
		--screenshot=$(CURDIR)/output/demo/report_screenshot.png file://$(CURDIR)/output/demo/report.html

bench-accuracy: setup
	$(PY) tools/bench_accuracy.py --jobs $(BENCH_JOBS)

bench-speed: setup
	$(PY) tools/bench_speed.py --detectors retinanet faster_rcnn

gpu-bundle: setup
	@test -n "$(D2_TASKDISTILL_DETECTRON2_SOURCE)" || { echo "make gpu-bundle: set D2_TASKDISTILL_DETECTRON2_SOURCE to upstream detectron2 (a source dir or archive)"; exit 2; }
	$(PY) tools/gpu_bundle.py --out $(GPU_BUNDLE)

# The GPU machine's twin on the CPU (tools/gpu_twin.py, in .ci/run): a Python 3.12 venv with the
# GPU machine's packages and none of the bundle's, offline; the check in it, for each source.
gpu-twin: gpu-bundle
	$(PY) tools/gpu_twin.py --bundle $(GPU_BUNDLE) --out $(GPU_TWIN_OUT) --detectron2 $(GPU_TWIN_DETECTRON2) \
		--suite-on $(GPU_TWIN_SUITE_ON)

clean-venv:
	rm -rf $(VENV) $(UPSTREAM_VENV) .venv-gpu-twin
