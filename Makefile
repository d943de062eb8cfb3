# pocketgpt — set-up-and-run targets. Each target creates .venv and installs what it needs first.
# torch==2.13.0 is installed before the package so pip never pulls a multi-GB CUDA build on a CPU box;
# on a CUDA machine, install the torch build you want into .venv first (`make venv TORCH=torch`).
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: venv demo test test-slow browser bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/.installed

# The main job: the whole pipeline on bundled data (tokenizer → pretrain → SFT → RM → PPO/DPO → GRPO → report)
demo: venv
	$(BIN)/pocketgpt speedrun --preset cpu-small --out runs/speedrun

# Headless Chromium for the web-page test (Debian packages; skipped quietly where apt is unavailable)
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-zenhei >/dev/null) || \
		echo "note: chromium not installed; the web-page browser test will be skipped"; }

test: venv browser
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: venv browser
	$(BIN)/python -m pytest -q

bench: venv
	for f in benchmarks/*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
