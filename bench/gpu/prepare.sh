#!/usr/bin/env bash
# Prepare the GPU check, here (a machine with the package registry), from the project root, after `make demo`:
#   bash bench/gpu/prepare.sh [--with-bnb]
# Fills .gpu/ (git-ignored) with what the GPU machine's image lacks, as wheels, plus the default model's
# tokenizer and the Alpaca rows. Then, on the GPU machine, with .gpu carried along: bash bench/gpu/check.sh
# Versions follow this checkout's .venv (what the lock installs), except torch: the GPU image has a CUDA build.
set -euo pipefail
[ -x .venv/bin/python ] || { echo "run 'make install' first (.venv missing)" >&2; exit 1; }
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/tok
# What the image lacks or holds at an older version (read from the image: torch 2.11, transformers 5.17).
pkgs="transformers huggingface_hub hf-xet httpx2 httpcore2 kernels tokenizers safetensors peft accelerate
      pydantic pydantic_core annotated-types typing-inspection trl datasets dill multiprocess rouge-score nltk
      fastapi starlette uvicorn gguf click regex truststore tomlkit optuna alembic sqlalchemy colorlog openai
      jiter distro sentencepiece liger-kernel"
[ "${1:-}" = "--with-bnb" ] && pkgs="$pkgs bitsandbytes"
freeze=$(.venv/bin/python -m pip freeze 2>/dev/null)
for name in $pkgs; do
  pin=$(echo "$freeze" | grep -i "^${name//[-_]/[-_]}==" | head -1 || true)
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl "${pin:-$name}" 2>/dev/null \
  || .venv/bin/python -m pip wheel -q --no-deps -w .gpu/whl "${pin:-$name}" 2>/dev/null \
  || echo "skipped ${pin:-$name} (no wheel)"
done
# bitsandbytes ships one library per CUDA/ROCm version: keep the CUDA 13 ones (the image's torch).
for wheel in .gpu/whl/bitsandbytes-*.whl; do
  [ -f "$wheel" ] && zip -q -d "$wheel" 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' 'bitsandbytes/libbitsandbytes_rocm*.so' || true
done
tok=$(dirname "$(find "${TUNEWRIGHT_CACHE:-$HOME/.cache/tunewright}" -name tokenizer.json 2>/dev/null | head -1)")
[ -f "$tok/tokenizer.json" ] || { echo "run 'make demo' once so the default model is cached" >&2; exit 1; }
gzip -9 -c "$tok/tokenizer.json" > .gpu/tok/tokenizer.json.gz
for name in tokenizer_config.json chat_template.jinja generation_config.json; do
  [ -f "$tok/$name" ] && cp "$tok/$name" .gpu/tok/
done
cp ../shared/data/alpaca/alpaca_data_first200.json .gpu/alpaca.json
du -sh .gpu
echo 'then: run(command="bash bench/gpu/check.sh", carry=[".gpu"], timeout_s=590)   (tree + .gpu under 64 MiB)'
