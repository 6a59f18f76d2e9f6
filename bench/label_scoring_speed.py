"""Label scoring speed: the prompts' pass packed and on packed weights, against the padded pass it replaced.

Zero-shot `label_scoring` on smollm2-135m (fp32) over the first rows of ../shared/data/sst2 and
../shared/data/trec test files, with bench/category.py's prompts, through the predictor's own loop
(`label_log_probs`: batches of 16 sorted by length). Two ways, alternating round by round:
- `padded`: the baseline: one left-padded pass over the prompts, `F.linear`;
- `tunewright`: the prompts as one packed row (`generate.packed_prefill`) and the linear layers on
  weights packed once for oneDNN (`kernels/prepacked.py`), as generation does.
Reports seconds, the ratio, the largest difference in label log-probabilities and whether every
row picks the same label.

    .venv/bin/python bench/label_scoring_speed.py --out bench/results/label_scoring_speed_avx2_fp32.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import pandas as pd
import torch

import tunewright
from tunewright import heads, predictor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from category import DATA, config_for  # noqa: E402
from report import save_json  # noqa: E402


def scorer(model: Any, prompt_ids: list[list[int]], padded: bool) -> torch.Tensor:
    """(N, L) label log-probabilities through the predictor's loop, the old way if `padded`."""
    with ExitStack() as stack:
        if padded:
            stack.enter_context(mock.patch.object(heads, "packed_prefill_applies", lambda model, mask: False))
            stack.enter_context(mock.patch.object(predictor, "inference_kernels", lambda model: nullcontext()))
        return model.label_log_probs(prompt_ids)


def measure_dataset(name: str, rows: int, rounds: int) -> dict[str, Any]:
    test = pd.read_csv(DATA / name / "test.csv").iloc[:rows]
    model = tunewright.from_config(config_for(name, "label_scoring", {"type": "none", "eval_batch_size": 16}))
    prompt_ids = model.encode_frame(test)
    lengths = sorted(map(len, prompt_ids), reverse=True)  # the predictor's batches: sorted by length, 16 each
    batches = [lengths[start : start + 16] for start in range(0, len(lengths), 16)]
    padding = sum(len(batch) * max(batch) - sum(batch) for batch in batches)
    scorer(model, prompt_ids[:16], padded=False)  # warm-up; packs the weights once (a server keeps them)
    scorer(model, prompt_ids[:16], padded=True)
    times: dict[str, list[float]] = {"padded": [], "tunewright": []}
    scores: dict[str, torch.Tensor] = {}
    for round_index in range(rounds):
        for method in times:
            started = time.perf_counter()
            scores[method] = scorer(model, prompt_ids, padded=method == "padded")
            times[method].append(time.perf_counter() - started)
            print(f"{name} round {round_index + 1} {method}: {times[method][-1]:.2f} s", file=sys.stderr, flush=True)
    medians = {method: statistics.median(seconds) for method, seconds in times.items()}
    return {
        "rows": len(prompt_ids), "labels": len(model.labels or []), "prompt_tokens": sum(map(len, prompt_ids)),
        "padding_tokens": padding,
        **{method: {"seconds": seconds, "median_s": medians[method]} for method, seconds in times.items()},
        "ratio": medians["padded"] / medians["tunewright"],
        "max_abs_log_prob_difference": float((scores["padded"] - scores["tunewright"]).abs().max()),
        "same_label_rows": int((scores["padded"].argmax(-1) == scores["tunewright"].argmax(-1)).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = {name: measure_dataset(name, args.rows, args.rounds) for name in ("sst2", "trec")}
    for name, entry in result.items():
        print(f"{name}: padded {entry['padded']['median_s']:.2f} s, tunewright {entry['tunewright']['median_s']:.2f} s"
              f" -> {entry['ratio']:.2f}x; max |diff| {entry['max_abs_log_prob_difference']:.2e};"
              f" same label {entry['same_label_rows']}/{entry['rows']}")
    save_json(result, args.out)


if __name__ == "__main__":
    main()
