"""GGUF export of the default model: time and file size per tensor type, and (where `make llama-cpp` has
built llama.cpp) how many of the demo's test prompts llama.cpp answers exactly as tunewright does.

Trains a short LoRA run of the demo (examples/dates, a few steps: the export cost does not depend on how
well it learned), then exports it once as a merged Hugging Face folder (the baseline step every GGUF
export contains) and once per tensor type with `tunewright export --format gguf`.

    .venv/bin/python bench/gguf_export.py --out bench/results/gguf_export_<machine>.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

import tunewright
from tunewright.data import encode_prompts, render_prompts

REPO = Path(__file__).resolve().parents[1]
DATES = REPO / "examples" / "dates"
LLAMA_PYTHON = REPO / ".venv-llamacpp" / "bin" / "python"
RUNNER = REPO / "tests" / "llama_cpp" / "runner.py"
QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0")


def llama_cpp_identical_rows(gguf: Path, tuned: Any, frame: pd.DataFrame, predicted: list[str]) -> int | None:
    """How many prompts llama.cpp answers (greedy) with tunewright's prediction; None without llama.cpp."""
    if not LLAMA_PYTHON.is_file():
        return None
    ids = encode_prompts(render_prompts(frame, tuned.config), tuned.tokenizer, tuned.config.prompt.use_chat_template)
    request = {"gguf": str(gguf), "prompts": ids, "max_new_tokens": tuned.config.generation.max_new_tokens,
               "texts": []}
    result = subprocess.run([str(LLAMA_PYTHON), str(RUNNER)], input=json.dumps(request), capture_output=True,
                            text=True, check=True)
    generated = [tuned.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                 for tokens in json.loads(result.stdout)["generated"]]
    return sum(left == right for left, right in zip(generated, predicted, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=30, help="demo test rows run in llama.cpp")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = yaml.safe_load((DATES / "config.yaml").read_text())
    config["trainer"] = {**config["trainer"], "max_steps": 6, "epochs": 1}
    frame = pd.read_csv(DATES / "test.csv", dtype=str).head(args.prompts)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        tunewright.train(config, pd.read_csv(DATES / "train.csv", dtype=str).head(64), run, show_progress=False)
        tuned = tunewright.load(run)
        predicted = [text.strip() for text in tuned.predict(frame)["prediction"]]
        started = time.perf_counter()
        tunewright.export(run, Path(scratch) / "hf", merge=True)
        merged_s = time.perf_counter() - started
        for quantization in QUANTIZATIONS:
            started = time.perf_counter()
            gguf = tunewright.export(run, Path(scratch) / quantization, format="gguf", quantization=quantization)
            seconds = time.perf_counter() - started
            rows.append({
                "quantization": quantization, "export_s": round(seconds, 1),
                "vs_merged_hf_export": round(seconds / merged_s, 2),
                "size_mb": round(gguf.stat().st_size / 1e6, 1),
                "llama_cpp_identical": llama_cpp_identical_rows(gguf, tuned, frame, predicted),
            })
            print(rows[-1], flush=True)
    result = {"machine": platform.processor() or platform.machine(), "prompts": len(frame),
              "merged_hf_export_s": round(merged_s, 1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
