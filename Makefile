# Two commands on a fresh machine: `make reproduce` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= runs/paper

.PHONY: install reproduce quick test container-test clean fashion-mnist

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

test: install
	$(PY) -m pytest

## Fashion-MNIST from Debian's package, where apt works (the loader also reads IDX files
## under the data root, or downloads them; docs/datasets.md).
fashion-mnist:
	apt-get install -y --no-install-recommends dataset-fashion-mnist

## The images and docker-compose.yml with podman, end to end (root; docs/containers.md).
container-test: install
	PYTHON=$(PY) containers/test.sh

clean:
	rm -rf $(VENV) runs build *.egg-info
