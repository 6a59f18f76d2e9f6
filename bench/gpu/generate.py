"""Generation on a GPU: tunewright (greedy loop; static cache) against transformers' batched `generate`.

64+ Alpaca prompts x 32 new greedy tokens on one model, in fp32 (tokens must be identical to
`generate`'s) and in bf16 (the share of rows with identical text is reported). One JSON line out.

    python bench/gpu/generate.py MODEL_DIR ALPACA_JSON OUT_JSON [--prompts 64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from tunewright.config import BackendConfig, GenerationSettings
from tunewright.data import collate_prompts, encode_prompts
from tunewright.generate import generate_ids, trim_at_stop
from tunewright.model import load_base_model

NEW_TOKENS, BATCH = 32, 16


def timed(work):  # noqa: ANN001, ANN201
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = work()
    torch.cuda.synchronize()
    return result, time.perf_counter() - started


def transformers_batched(model, tokenizer, prompt_ids: list[list[int]]) -> list[list[int]]:  # noqa: ANN001
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    rows = []
    for start in range(0, len(prompt_ids), BATCH):
        batch = {k: v.cuda() for k, v in collate_prompts(prompt_ids[start : start + BATCH],
                                                         tokenizer.pad_token_id).items()}
        with torch.inference_mode():
            output = model.generate(**batch, generation_config=config)
        rows += [trim_at_stop(r, {tokenizer.eos_token_id}) for r in output[:, batch["input_ids"].shape[1] :].tolist()]
    return rows


def measure(model_dir: str, prompts: list[str], dtype: str) -> dict[str, object]:
    loaded = load_base_model(model_dir, BackendConfig(device="cuda", dtype=dtype))
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    prompt_ids = encode_prompts(prompts, tokenizer, use_chat_template=True)
    result: dict[str, object] = {"dtype": dtype, "prompts": len(prompts), "new_tokens": NEW_TOKENS}
    reference, result["transformers_batched_s"] = timed(lambda: transformers_batched(model, tokenizer, prompt_ids))
    for cache in ("dynamic", "static"):
        settings = GenerationSettings(max_new_tokens=NEW_TOKENS, batch_size=BATCH * 4, cache=cache)
        generate_ids(model, tokenizer, prompt_ids[:BATCH], settings)  # warm-up (static: compiles)
        ours, seconds = timed(lambda: generate_ids(model, tokenizer, prompt_ids, settings))  # noqa: B023
        result[f"tunewright_{cache}_s"] = seconds
        result[f"tunewright_{cache}_speedup"] = result["transformers_batched_s"] / seconds  # type: ignore[operator]
        result[f"tunewright_{cache}_identical_rows"] = sum(a == b for a, b in zip(ours, reference, strict=True))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("alpaca", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--prompts", type=int, default=64)
    args = parser.parse_args()
    rows = json.loads(args.alpaca.read_text(encoding="utf-8"))[: args.prompts]
    prompts = [row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "") for row in rows]
    results = []
    for dtype in ("float32", "bfloat16"):
        results.append(measure(args.model, prompts, dtype))
        torch.cuda.empty_cache()  # the previous dtype's model is gone with its call
    print(json.dumps(results))
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
