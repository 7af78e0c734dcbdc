# Two commands set up a fresh machine: `make demo` and `make test`. Both create .venv and install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-gpu bench venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-cache-dir -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The demo's 15-minute budget counts from the moment make started, installing included.
STARTED := $(shell date +%s)

demo: $(STAMP)
	$(BIN)/ichscan demo --out runs/demo --started-at $(STARTED)

# The test files spread over the cores, one file per process at a time (module fixtures are drawn once), at most
# 4 processes (each holds torch and a few phantom series in memory). TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# On a machine with a CUDA device: the GPU's probabilities against the CPU's (fp32 and bf16).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu -rs

# Speed benchmarks. bench/realct.py measures a checkpoint on real CT kept outside the repository,
# bench/crossval.py cross-validates on such data (--data), bench/operating_point.py scores operating
# points on two sets of predictions (--pred, --test-pred), and bench/demo.py times a whole demo against its
# 15 minutes (--out); run those by hand.
bench: $(STAMP)
	for b in bench/*.py; do case $$b in bench/realct.py|bench/crossval.py|bench/operating_point.py|bench/demo.py) continue;; esac; \
		echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
