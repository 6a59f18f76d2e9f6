"""Generation speed: tunewright's greedy loop against transformers' `generate`, in one run.

16 Stanford Alpaca prompts (instruction + input, as a chat user turn) x 32 new greedy tokens on
smollm2-135m (fp32 by default), three ways, interleaved round by round so they share the machine's load:
transformers `generate` one prompt at a time (the reference design), `generate` on one
left-padded batch, and `tunewright.generate.generate_ids`. Reports new tokens/s (the same
numerator for all: tokens up to and including each row's EOS), ratios, the fraction of the
measured matmul limit, and whether the greedy tokens are identical. tunewright runs the linear
layers on weights packed once per model for oneDNN (`tunewright.kernels.prepacked`); the one-off packing
time is reported separately (`tunewright_prepack_once_s`), the timed runs reuse the packed weights
as a server's requests do.

`--dtype bfloat16` loads the model in bf16 for all three (fractions then use the bf16 matmul
limit) and also times batched `generate` on the fp32 model, to show what bf16 weights buy and
how many rows' greedy tokens they change.

    .venv/bin/python bench/generate_speed.py --out bench/results/generate_speed_avx2_fp32.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from tunewright.config import BackendConfig, GenerationSettings
from tunewright.data import collate_prompts, encode_prompts
from tunewright.generate import generate_ids, trim_at_stop
from tunewright.kernels.prepacked import prepack
from tunewright.model import load_base_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul_limit import measure  # noqa: E402
from report import save_json  # noqa: E402

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_data_first200.json"


def alpaca_prompts(count: int) -> list[str]:
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[:count]
    return [row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "") for row in rows]


def hf_generate(model, tokenizer, prompt_ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    batch = collate_prompts(prompt_ids, tokenizer.pad_token_id)
    with torch.inference_mode():
        output = model.generate(**batch, generation_config=config)
    return output[:, batch["input_ids"].shape[1] :].tolist()


def useful_tokens(rows: list[list[int]], stop_ids: set[int]) -> int:
    """Tokens up to and including the first stop token of each row."""
    return sum(min(len(row), len(trim_at_stop(row, stop_ids)) + 1) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the batched runs and ours")
    parser.add_argument("--single-rounds", type=int, default=1, help="rounds of the one-at-a-time loop")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights dtype of the model all three methods run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(2)
    loaded = load_base_model("smollm2-135m", BackendConfig(device="cpu", dtype="float32"))
    fp32_model, tokenizer = loaded.model.eval(), loaded.tokenizer
    model = fp32_model if args.dtype == "float32" else copy.deepcopy(fp32_model).to(torch.bfloat16)
    prompt_ids = encode_prompts(alpaca_prompts(args.prompts), tokenizer, use_chat_template=True)
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    settings = GenerationSettings(max_new_tokens=args.new_tokens, batch_size=args.prompts)

    methods = {
        "transformers_one_at_a_time": lambda: [hf_generate(model, tokenizer, [ids], args.new_tokens)[0]
                                               for ids in prompt_ids],
        "transformers_batched": lambda: hf_generate(model, tokenizer, prompt_ids, args.new_tokens),
        "tunewright": lambda: generate_ids(model, tokenizer, prompt_ids, settings),
    }
    if args.dtype != "float32":
        methods["transformers_batched_fp32"] = lambda: hf_generate(fp32_model, tokenizer, prompt_ids,
                                                                   args.new_tokens)
    started = time.perf_counter()
    prepack(model)  # what tunewright's first generation on this model pays once (weights packed for oneDNN)
    prepack_s = time.perf_counter() - started
    generate_ids(model, tokenizer, prompt_ids[:2], settings)  # warm-up (allocator, oneDNN kernels)
    if model is not fp32_model:
        generate_ids(fp32_model, tokenizer, prompt_ids[:2], settings)
    times: dict[str, list[float]] = {name: [] for name in methods}
    outputs: dict[str, list[list[int]]] = {}
    matmul_before = measure(2)
    for round_index in range(args.rounds):
        for name, run in methods.items():
            if name == "transformers_one_at_a_time" and round_index >= args.single_rounds:
                continue
            started = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - started)
            print(f"round {round_index + 1} {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    matmul_after = measure(2)

    trimmed = {name: [trim_at_stop(row, stop_ids) for row in rows] for name, rows in outputs.items()}
    tokens = useful_tokens(outputs["transformers_batched"], stop_ids)
    prompt_tokens = sum(map(len, prompt_ids))
    params = sum(p.numel() for p in model.parameters())
    math = "fp32" if args.dtype == "float32" else "bf16"
    limit = max(matmul_before[f"{math}_gflops"], matmul_after[f"{math}_gflops"])
    result: dict[str, object] = {
        "dtype": args.dtype, "prompts": args.prompts, "new_tokens_max": args.new_tokens, "new_tokens_useful": tokens,
        "prompt_tokens": prompt_tokens, "matmul_before": matmul_before, "matmul_after": matmul_after,
        "tunewright_prepack_once_s": prepack_s,
        "identical_tunewright_vs_batched": trimmed["tunewright"] == trimmed["transformers_batched"],
        "identical_tunewright_vs_one_at_a_time":
            trimmed["tunewright"] == trimmed["transformers_one_at_a_time"],
        "rows_identical_vs_batched": sum(
            a == b for a, b in zip(trimmed["tunewright"], trimmed["transformers_batched"], strict=True)),
    }
    speed = {}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        # FLOPs: 2 x params per token, prompt (prefill) + new tokens, LM head included.
        flops = 2 * params * (prompt_tokens + tokens)
        speed[name] = median
        result[name] = {"seconds": seconds, "median_s": median, "new_tokens_per_s": tokens / median,
                        f"fraction_of_{math}_matmul_limit": flops / median / 1e9 / limit}
    result["ratio_vs_batched"] = speed["transformers_batched"] / speed["tunewright"]
    result["ratio_vs_one_at_a_time"] = speed["transformers_one_at_a_time"] / speed["tunewright"]
    if "transformers_batched_fp32" in speed:
        result["ratio_vs_batched_fp32"] = speed["transformers_batched_fp32"] / speed["tunewright"]
        result["rows_identical_vs_batched_fp32"] = sum(
            a == b for a, b in zip(trimmed["tunewright"], trimmed["transformers_batched_fp32"], strict=True))
    print(json.dumps(result, indent=1))
    save_json(result, args.out)


if __name__ == "__main__":
    main()
