# lossd: `make run` serves, `make test` runs the whole suite. Both set everything up from nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 50051
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test demo lint proto bench bench-readme image docker-lint docs clean

help: ## show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.txt client/pyproject.toml server/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e ./client -e ./server
	touch $(STAMP)

install: $(STAMP) ## create .venv and install both packages with every dependency (torch==2.13.0)

run: $(STAMP) ## serve on $(HOST):$(PORT) (override: make run PORT=50052)
	$(VENV)/bin/lossd-server --host $(HOST) --port $(PORT)

test: $(STAMP) ## install, then run the whole suite (fails when no test ran); one layer: make test LAYER=unit|service|container|neighbours
	$(PY) -m pytest $(if $(LAYER),-m $(LAYER)) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

demo: $(STAMP) ## start a server, run the examples against it, stop it
	$(PY) examples/demo.py

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check client/lossd_client server/lossd_server

docs: $(STAMP) ## HTML API reference of the client (pdoc, from its docstrings) into docs/api/
	$(VENV)/bin/pdoc -o docs/api --docformat restructuredtext lossd_client lossd_client.hf lossd_client.base lossd_client.layout lossd_client.compare lossd_client.compare_stats

proto: $(STAMP) ## regenerate client/lossd_client/_proto from proto/
	$(PY) proto/generate.py

bench: $(STAMP) ## benchmarks: ratios to the transport floor, a naive gRPC server and in-process torch; cold start
	$(PY) -m benchmarks $(BENCH_ARGS)

bench-readme: $(STAMP) ## put the last make bench run's figures into README.md (its JSON and chart into docs/)
	$(PY) -m benchmarks.readme

image: $(STAMP) ## build, run and probe the CPU image with podman (root; see ../shared/container)
	BUILDAH_FORMAT=docker ../shared/container/ctr-check.sh --host-port 0 --tag localhost/lossd/test:latest \
	  --wheels "$$(pip config get global.find-links)" --build-arg TORCH_INDEX_URL= \
	  --check '$(PY) docker/container_probe.py' docker/Dockerfile . 50051

docker-lint: ## hadolint both Dockerfiles
	../shared/container/hadolint.sh --failure-threshold warning docker/Dockerfile docker/Dockerfile.cuda

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
