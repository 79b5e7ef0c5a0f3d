# Two commands on a fresh machine: `make reproduce` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= runs/paper

.PHONY: install reproduce quick test test-deps container-test clean fashion-mnist

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

## The paper's experiment, end to end (about 30 minutes on 2 cores).
reproduce: install
	$(VENV)/bin/hybnn reproduce --profile paper --out $(OUT)

## A first look with short training (about 5 minutes on 2 cores).
quick: install
	$(VENV)/bin/hybnn reproduce --profile quick --out runs/quick

## The suite in one pytest worker per CPU (pytest-xdist; a file's tests share one worker, in order, since
## some share a module fixture); `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= auto
test: install test-deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

## What some tests need beyond the venv: nginx (the Fleet-only TLS front) and Debian's
## Fashion-MNIST. Installed with apt where this runs as root; elsewhere the tests that
## need them are skipped, and pytest's summary names each skip with the command that
## removes it.
TEST_PACKAGES := nginx dataset-fashion-mnist
test-deps:
	@missing=""; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing what the tests need:$$missing"; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "Not root or no apt: the tests that need$$missing will be skipped (sudo apt-get install$$missing)"; \
	  fi; \
	fi

## Fashion-MNIST from Debian's package, where apt works (the loader also reads IDX files
## under the data root, or downloads them; docs/datasets.md).
fashion-mnist:
	apt-get install -y --no-install-recommends dataset-fashion-mnist

## The images and docker-compose.yml with podman, end to end (root; docs/containers.md).
container-test: install
	PYTHON=$(PY) containers/test.sh

clean:
	rm -rf $(VENV) runs build *.egg-info
