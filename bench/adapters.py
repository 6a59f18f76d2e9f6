"""Adapter types side by side on the default model: trainable parameters, peak RSS, seconds per step.

Every case runs the same small job (issue 5) in a fresh subprocess, so the peak RSS of one case
never includes another's: smollm2-135m, the first 200 Alpaca rows (prompt = instruction + input,
cut to 32 tokens; target = output, cut to 32 tokens), batch 4, 10 optimizer steps, AdamW, lr 1e-4.
Seconds per step is the median over steps 2..10 (step 1 pays one-time allocation). `lora` runs
first and again last, so the table shows how much the shared machine drifted during the run.

    .venv/bin/python bench/adapters.py --out bench/results/adapters.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_data_first200.json"
Q_V = ["q_proj", "v_proj"]
CASES: dict[str, dict[str, Any] | None] = {
    # q/v, as the figures in BENCHMARKS.md were measured (the default is now every linear layer)
    "lora": {"type": "lora", "target_modules": Q_V},  # r 8
    "adalora": {"type": "adalora"},  # init_r 12 -> r 8
    "ia3": {"type": "ia3"},
    "loha": {"type": "loha", "target_modules": Q_V},
    "lokr": {"type": "lokr", "target_modules": Q_V},
    "prompt_tuning": {"type": "prompt_tuning"},  # 16 virtual tokens
    "prefix_tuning": {"type": "prefix_tuning"},  # 16 virtual tokens
    "full_last_2_layers": {"type": "full", "trainable_layers": [-2, -1]},
    "full": None,
    "lora_repeat": {"type": "lora", "target_modules": Q_V},
}
STEPS, BATCH_SIZE, MAX_PROMPT, MAX_TARGET = 10, 4, 32, 32


def run_case(name: str) -> dict[str, Any]:
    """One case, in this process: load, attach, train STEPS steps, measure."""
    import pandas as pd
    import psutil
    from accelerate import Accelerator

    from tunewright.adapters import attach_adapter, count_parameters, optimizer_step_hook
    from tunewright.config import AdapterConfig, BackendConfig, TrainerConfig
    from tunewright.data import build_examples, encode_prompts, fit_prompts
    from tunewright.model import load_base_model
    from tunewright.objective import LanguageModelObjective
    from tunewright.train import fit

    rows = pd.read_json(DATA)
    prompts = [f"{r.instruction}\n{r.input}".strip() + "\nResponse:" for r in rows.itertuples()]
    loaded = load_base_model("smollm2-135m", BackendConfig(device="cpu"))
    rss_loaded = psutil.Process().memory_info().rss
    prompt_ids, kept = fit_prompts(encode_prompts(prompts, loaded.tokenizer), MAX_PROMPT, "truncate")
    examples = build_examples(prompt_ids, [rows.output[i] for i in kept], loaded.tokenizer, MAX_TARGET)
    spec = CASES[name]
    adapter = AdapterConfig(**spec) if spec is not None else None
    model = attach_adapter(loaded.model, adapter, total_steps=STEPS)
    report = count_parameters(model)
    stamps: list[float] = []
    losses: list[float] = []

    def on_log(record: dict[str, Any]) -> None:
        stamps.append(time.perf_counter())
        losses.append(record["loss"])

    cfg = TrainerConfig(max_steps=STEPS, batch_size=BATCH_SIZE, learning_rate=1e-4, lr_scheduler="constant")
    started = time.perf_counter()
    fit(LanguageModelObjective(model), examples, [], cfg, Accelerator(cpu=True), loaded.tokenizer.pad_token_id,
        on_log=on_log, show_progress=False, after_optimizer_step=optimizer_step_hook(model))
    step_seconds = [b - a for a, b in zip([started, *stamps[:-1]], stamps, strict=True)]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return {
        "case": name, "adapter": spec, "trainable_parameters": report.trainable,
        "total_parameters": report.total, "trainable_percent": 100 * report.fraction,
        "seconds_per_step": statistics.median(step_seconds[1:]), "first_step_seconds": step_seconds[0],
        "peak_rss_mib": peak_kib / 1024, "rss_after_load_mib": rss_loaded / 2**20,
        "loss_first": losses[0], "loss_last": losses[-1], "steps": len(stamps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/adapters.jsonl"))
    parser.add_argument("--case", help="Run one case in this process (used by the parent).")
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="Cases to run (default: all).")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.cases:
        done = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(json.dumps(result), flush=True)
    args.out.write_text("".join(json.dumps(result) + "\n" for result in results))
    lora = statistics.mean(r["seconds_per_step"] for r in results if r["case"] in ("lora", "lora_repeat")) or 1
    print("\n| case | trainable params | % of model | s/step | vs lora | peak RSS MiB | loss step 1 -> 10 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results:
        print(f"| {r['case']} | {r['trainable_parameters']:,} | {r['trainable_percent']:.3f} | "
              f"{r['seconds_per_step']:.3f} | {r['seconds_per_step'] / lora:.2f} | {r['peak_rss_mib']:.0f} | "
              f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} |")


if __name__ == "__main__":
    main()
