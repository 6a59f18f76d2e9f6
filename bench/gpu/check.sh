#!/usr/bin/env bash
# The GPU check, ON the GPU machine, from the project root, with .gpu (bench/gpu/prepare.sh) carried along:
#   BUDGET=540 bash bench/gpu/check.sh        (give the call about 40 s more than BUDGET)
# 0. packed rows through torch's varlen flash attention against samples alone; 1. the test suite on CUDA;
# 2. LoRA training speed side by side (tunewright, Trainer + peft, trl, trl packing)
# on a random SmolLM2-1.7B-shaped model in bf16, with tunewright's top operators; 3. generation against batched
# `generate`; 4. QLoRA end to end, if bitsandbytes travelled. Everything lands in $OUT; stages skip when the
# budget runs short.
G=$PWD/.gpu; W=$(mktemp -d); T0=$(date +%s); OUT=${OUT:-$W/out}; mkdir -p "$OUT"
left() { echo $(( ${BUDGET:-540} - ($(date +%s) - T0) )); }
stage() { echo "== $1 (t=$(( $(date +%s) - T0 )) s, $(left) s left)"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" "$G"/whl/*.whl \
  || exit 1
export PYTHONPATH=$W/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, accelerate, trl; print('versions', torch.__version__, \
transformers.__version__, peft.__version__, accelerate.__version__, trl.__version__)" | tee -a "$OUT/gpu.txt"
python3 bench/gpu/make_model.py "$W/m17b" "$G/tok" | tee -a "$OUT/gpu.txt"

stage "packed rows through torch's varlen flash attention"
timeout 120 python3 bench/gpu/varlen_check.py "$OUT/varlen_check.json" > "$OUT/varlen_check.log" 2>&1
echo "varlen_check rc=$?"; tail -c 600 "$OUT/varlen_check.log"

stage "pytest on CUDA"
timeout $(( $(left) / 3 )) python3 -m pytest -q -m "not integration" -n 8 -p no:cacheprovider \
  > "$OUT/pytest_cuda.log" 2>&1; echo "pytest rc=$?"
grep -E "passed|failed" "$OUT/pytest_cuda.log" | tail -1

stage "training speed"
timeout $(( $(left) - 150 )) python3 bench/train_speed.py --model "$W/m17b" --device cuda --precision bf16 \
  --batch-size 16 --samples 400 --rounds 1 --peak-tflops "${PEAK_TFLOPS:-989}" --alpaca "$G/alpaca.json" \
  --profile "$OUT/tunewright_profile.txt" --out "$OUT/train_speed_gpu.json" > "$OUT/train_speed.log" 2>&1
echo "train_speed rc=$?"; grep -E "^round|ratios" -A3 "$OUT/train_speed.log" | head -12

stage "generation"
[ "$(left)" -gt 90 ] && timeout $(( $(left) - 60 )) python3 bench/gpu/generate.py "$W/m17b" "$G/alpaca.json" \
  "$OUT/generation.json" > "$OUT/generation.log" 2>&1; tail -c 1200 "$OUT/generation.log"

if ls "$G"/whl/bitsandbytes-*.whl >/dev/null 2>&1 && [ "$(left)" -gt 60 ]; then
  stage "QLoRA"
  python3 - "$G/alpaca.json" "$W/alpaca.csv" <<'PY'
import json, sys
import pandas as pd
rows = json.load(open(sys.argv[1]))
pd.DataFrame({"prompt": [r["instruction"] + ("\n\n" + r["input"] if r["input"] else "") for r in rows],
              "output": [r["output"] for r in rows]}).to_csv(sys.argv[2], index=False)
PY
  timeout $(( $(left) - 5 )) python3 bench/gpu/qlora.py "$W/m17b" "$W/alpaca.csv" "$W/qlora" "$OUT/qlora.json" \
    > "$OUT/qlora.log" 2>&1; tail -c 800 "$OUT/qlora.log"
fi
stage "done"
