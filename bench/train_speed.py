"""Training speed: tunewright against transformers Trainer + peft and trl SFTTrainer, in one run.

Same model (smollm2-135m, fp32 weights, CPU), same data (the first 100 Stanford Alpaca rows, the
instruction + input as a chat user turn -> the output + EOS, tokenized once by tunewright and
cut to 256 tokens), same settings (LoRA r=8, alpha 16, dropout 0.05 on q_proj/v_proj; batch 4;
AdamW at a constant 2e-4; clip 1.0; --samples samples, one epoch by default), four ways:

- `tunewright`: `tunewright.train.fit` with packing (its default: one row per micro-batch, no
  padding, attention per sample);
- `trainer_peft`: transformers `Trainer` + peft, rows padded to the longest in each batch;
- `trl`: trl `SFTTrainer` on the same token ids and completion masks, no packing;
- `trl_packing`: the same with `packing=True` (trl's best-fit-decreasing packing, padding-free).

Each run is a fresh subprocess (so peak RSS is its own), and the runs are interleaved round by
round, each round starting with the next method, so the machine's load falls on all of them
alike. Throughput counts real (non-padding) tokens from the second optimizer step on (the
first one warms up kernels and allocators).
The fp32 and bf16 matmul limits are measured in the same run, before and after.
`--precision` sets the math of all four alike: `fp32`, or `bf16` autocast (tunewright's
`trainer.precision: bf16`, `bf16=True` for Trainer and trl); fractions of the matmul limit
are taken against the limit of that precision.

    .venv/bin/python bench/train_speed.py --rounds 3 --precision fp32 --out bench/results/train_speed_avx2_fp32.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul_limit import measure  # noqa: E402
from report import save_json  # noqa: E402

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_data_first200.json"
ROWS, MAX_LENGTH, LEARNING_RATE, SEED = 100, 256, 2e-4, 42
# Set from the command line (the workers get the same flags): the model, its device and the batch size.
MODEL, DEVICE, BATCH_SIZE, PRECISION, PROFILE = "smollm2-135m", "cpu", 4, "fp32", None
METHODS = ["tunewright", "trainer_peft", "trl", "trl_packing"]
MEAN_SAMPLE_TOKENS = 111  # measured: 11,055 real tokens in the 100 rows (cut at 256)


def max_steps(method: str, samples: int) -> int:
    """Optimizer steps that cover about `samples` samples (a trl packing step holds ~4 x 256 tokens)."""
    if method == "trl_packing":
        return max(2, -(-samples * MEAN_SAMPLE_TOKENS // (BATCH_SIZE * MAX_LENGTH)) + 1)
    return max(2, samples // BATCH_SIZE)


# --- shared setup (inside each worker) -------------------------------------------------------


def load_model_and_examples() -> tuple[Any, Any, list[Any]]:
    """smollm2-135m in fp32 and the tokenized Alpaca rows, exactly as tunewright builds them."""
    from tunewright.config import BackendConfig
    from tunewright.data import build_examples, encode_prompts
    from tunewright.model import load_base_model

    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[:ROWS]
    prompts = [row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "") for row in rows]
    # fp32 weights on CPU; on CUDA the weights' dtype follows --precision (bf16 weights, as Trainer loads them)
    dtype = "float32" if DEVICE == "cpu" or PRECISION == "fp32" else "bfloat16"
    loaded = load_base_model(MODEL, BackendConfig(device=DEVICE, dtype=dtype))
    prompt_ids = encode_prompts(prompts, loaded.tokenizer, use_chat_template=True)
    examples = build_examples(prompt_ids, [row["output"] for row in rows], loaded.tokenizer)
    for example in examples:  # the same max length for everyone: cut the end of long samples
        example.input_ids, example.labels = example.input_ids[:MAX_LENGTH], example.labels[:MAX_LENGTH]
    return loaded.model, loaded.tokenizer, examples


def in_tunewright_order(examples: list[Any]) -> list[Any]:
    """The samples in the order tunewright's first epoch takes them (4 per step).

    Trainer and trl read them sequentially, so step n of every unpacked method trains on the same
    four samples and the loss curves can be compared step by step.
    """
    from tunewright.train import epoch_batches

    return [examples[i] for batch in epoch_batches(len(examples), BATCH_SIZE, SEED, 0) for i in batch]


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                      target_modules=["q_proj", "v_proj"], bias="none")


class StepClock:
    """Timestamps of optimizer steps, and the real tokens each one trained on."""

    def __init__(self) -> None:
        self.times: list[float] = [time.perf_counter()]
        self.tokens: list[int] = []
        self.losses: list[float] = []

    def summary(self) -> dict[str, Any]:
        # Steps 2..n: the first step pays for one-off warm-up work.
        seconds = self.times[-1] - self.times[1]
        tokens = sum(self.tokens[1 : len(self.times) - 1])
        return {"steps": len(self.times) - 1, "timed_tokens": tokens, "timed_seconds": seconds,
                "tokens_per_s": tokens / seconds, "total_tokens": sum(self.tokens),
                "losses": self.losses, "final_loss": statistics.mean(self.losses[-5:]),
                "mean_loss": statistics.mean(self.losses)}


# --- the four workers ----------------------------------------------------------------------------


def run_tunewright(clock: StepClock, steps: int, bf16: bool) -> None:
    from accelerate import Accelerator
    from peft import get_peft_model

    from tunewright.config import TrainerConfig
    from tunewright.objective import LanguageModelObjective
    from tunewright.train import fit, optimizer_windows

    model, tokenizer, examples = load_model_and_examples()
    torch.manual_seed(SEED)
    model = get_peft_model(model, lora_config())
    cfg = TrainerConfig(epochs=1, max_steps=steps, batch_size=BATCH_SIZE, learning_rate=LEARNING_RATE,
                        lr_scheduler="constant",
                        max_grad_norm=1.0, seed=SEED, packing=True, precision="bf16" if bf16 else "fp32")
    windows = optimizer_windows(len(examples), cfg, 1)
    plan = [next(windows)[1] for _ in range(-(-len(examples) // BATCH_SIZE))]

    def on_log(record: dict[str, Any]) -> None:
        clock.times.append(time.perf_counter())
        window = plan[record["step"] - 1]
        clock.tokens.append(sum(len(examples[i].input_ids) for batch in window for i in batch))
        clock.losses.append(record["loss"])

    clock.times[0] = time.perf_counter()
    with profiled(PROFILE):
        fit(LanguageModelObjective(model), examples, [], cfg, Accelerator(cpu=DEVICE == "cpu"), tokenizer.pad_token_id,
            on_log=on_log, show_progress=False)


@contextmanager
def profiled(path: str | None) -> Iterator[None]:
    """With --profile PATH: torch.profiler over tunewright's run, its top operators written to PATH."""
    if not path:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as profiler:
        yield
    sort = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    Path(path).write_text(profiler.key_averages().table(sort_by=sort, row_limit=40))


def hf_callback(clock: StepClock, counted: list[int]) -> Any:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            clock.times[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            clock.times.append(time.perf_counter())
            clock.tokens.append(counted.pop(0))

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    return Clock()


def counting(collator: Any, counted: list[int]) -> Any:
    """Wrap a collator to record each batch's real tokens (non-padding)."""

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collator(features)
        mask = batch.get("attention_mask")
        counted.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    return collate


def common_args(steps: int, bf16: bool) -> dict[str, Any]:
    return {"max_steps": steps, "per_device_train_batch_size": BATCH_SIZE, "num_train_epochs": 1,
            "learning_rate": LEARNING_RATE,
            "lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0,
            "logging_steps": 1, "save_strategy": "no", "report_to": "none", "use_cpu": DEVICE == "cpu", "seed": SEED,
            "dataloader_num_workers": 0, "disable_tqdm": True, "train_sampling_strategy": "sequential",
            "bf16": bf16}


def run_trainer_peft(clock: StepClock, steps: int, bf16: bool) -> None:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tokenizer, examples = load_model_and_examples()
    torch.manual_seed(SEED)
    model = get_peft_model(model, lora_config())
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
                                  "labels": e.labels} for e in in_tunewright_order(examples)])
    counted: list[int] = []
    collator = counting(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100), counted)
    args = TrainingArguments(output_dir="/tmp/tunewright-bench-trainer", **common_args(steps, bf16))
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      callbacks=[hf_callback(clock, counted)])
    trainer.train()


def run_trl(clock: StepClock, packing: bool, steps: int, bf16: bool) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer, examples = load_model_and_examples()
    torch.manual_seed(SEED)
    # Pre-tokenized rows: trl skips its own tokenization and trains on exactly our token ids.
    dataset = Dataset.from_list([{"input_ids": e.input_ids,
                                  "completion_mask": [int(label != -100) for label in e.labels]}
                                 for e in in_tunewright_order(examples)])
    counted: list[int] = []
    # trl's own defaults are bf16 autocast and gradient checkpointing: the precision follows
    # --precision like everyone else's, and checkpointing is off (it recomputes every layer's forward).
    args = SFTConfig(output_dir="/tmp/tunewright-bench-trl", max_length=MAX_LENGTH, packing=packing,
                     completion_only_loss=True, gradient_checkpointing=False, **common_args(steps, bf16))
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config(), callbacks=[hf_callback(clock, counted)])
    trainer.data_collator = counting(trainer.data_collator, counted)
    trainer.train()


def worker(method: str, samples: int, bf16: bool) -> dict[str, Any]:
    if DEVICE == "cpu":
        torch.set_num_threads(2)
    clock = StepClock()
    steps = max_steps(method, samples)
    if method == "tunewright":
        run_tunewright(clock, steps, bf16)
    elif method == "trainer_peft":
        run_trainer_peft(clock, steps, bf16)
    else:
        run_trl(clock, packing=method == "trl_packing", steps=steps, bf16=bf16)
    # ru_maxrss is in KiB on Linux: the whole process, model and data included.
    memory = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if DEVICE == "cuda":
        memory["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return {"method": method, **clock.summary(), **memory}


# --- the driver ----------------------------------------------------------------------------------


def model_shape() -> dict[str, int]:
    """(hidden, layers, intermediate, key/value width, vocabulary) of --model, read from its config."""
    if MODEL == "smollm2-135m":
        return {"hidden": 576, "layers": 30, "inter": 1536, "kv": 192, "vocab": 49152}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(MODEL)
    head_dim = config.hidden_size // config.num_attention_heads
    return {"hidden": config.hidden_size, "layers": config.num_hidden_layers, "inter": config.intermediate_size,
            "kv": config.num_key_value_heads * head_dim, "vocab": config.vocab_size}


def flops_per_token(target_fraction: float, shape: dict[str, int]) -> dict[str, float]:
    """Matmul FLOPs per trained token of the model with LoRA (see BENCHMARKS.md for the counting)."""
    hidden, layers, inter, kv, vocab = (shape[key] for key in ("hidden", "layers", "inter", "kv", "vocab"))
    linear = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)  # SmolLM2-135M: 106M frozen
    total_params = linear + vocab * hidden + layers * 2 * hidden + hidden  # 134.5M (tied embeddings)
    # Frozen weights: forward 2N + input-gradient 2N (no weight gradient); LM head on target tokens only.
    useful = 4 * linear + 4 * vocab * hidden * target_fraction
    return {"useful": useful, "six_n": 6 * total_params, "linear_params": linear,
            "total_params": total_params}


def run_worker(method: str, samples: int, precision: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", method, "--samples", str(samples), "--precision", precision,
               "--model", MODEL, "--device", DEVICE, "--batch-size", str(BATCH_SIZE), "--alpaca", str(ALPACA)]
    if PROFILE and method == "tunewright":
        command += ["--profile", PROFILE]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    global MODEL, DEVICE, BATCH_SIZE, PRECISION, PROFILE, ALPACA
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--samples", type=int, default=ROWS, help="samples to train on (about; per method)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="the math of all methods: fp32, or bf16 autocast")
    parser.add_argument("--model", default=MODEL, help="base model (default smollm2-135m; a folder on GPUs)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=DEVICE)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak for --precision (MFU against it; default: the measured matmul limit)")
    parser.add_argument("--alpaca", type=Path, default=ALPACA, help="the Alpaca rows (JSON)")
    parser.add_argument("--profile", default=None, help="write the top operators of tunewright's run to this file")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    MODEL, DEVICE, BATCH_SIZE, PRECISION = args.model, args.device, args.batch_size, args.precision
    PROFILE, ALPACA = args.profile, args.alpaca
    if args.worker:
        print(json.dumps(worker(args.worker, args.samples, args.precision == "bf16")))
        return

    methods = args.methods.split(",")
    matmul = [measure(2)] if DEVICE == "cpu" else []
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in methods}
    for round_index in range(args.rounds):
        # Each round starts with another method, so no method always runs first (in two runs
        # tunewright, then always first, was ~10% slower in round 1 than in round 2).
        for method in methods[round_index % len(methods) :] + methods[: round_index % len(methods)]:
            result = run_worker(method, args.samples, args.precision)
            runs[method].append(result)
            print(f"round {round_index + 1} {method}: {result['tokens_per_s']:.1f} tokens/s, "
                  f"loss {result['final_loss']:.3f}, peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    if DEVICE == "cpu":
        matmul.append(measure(2))

    limit = args.peak_tflops * 1e3 if args.peak_tflops else max(m[f"{args.precision}_gflops"] for m in matmul)
    report: dict[str, Any] = {"rows": ROWS, "samples": args.samples, "max_length": MAX_LENGTH, "model": MODEL,
                              "device": DEVICE, "batch_size": BATCH_SIZE, "precision": args.precision,
                              "matmul": matmul, "matmul_limit_gflops": limit, "methods": {}}
    target_fraction = target_token_fraction()
    flops = flops_per_token(target_fraction, model_shape())
    report["flops_per_token"] = flops
    report["target_fraction"] = target_fraction
    for method, results in runs.items():
        speed = statistics.median(r["tokens_per_s"] for r in results)
        report["methods"][method] = {
            "tokens_per_s_median": speed, "tokens_per_s_runs": [r["tokens_per_s"] for r in results],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in results),
            **({"peak_gpu_mib": max(r["peak_gpu_mib"] for r in results)} if "peak_gpu_mib" in results[0] else {}),
            "final_loss": statistics.mean(r["final_loss"] for r in results),
            "mean_loss": statistics.mean(r["mean_loss"] for r in results),
            "steps": results[0]["steps"], "total_tokens": results[0]["total_tokens"],
            "fraction_of_matmul_limit": speed * flops["useful"] / 1e9 / limit,
            "mfu_6n": speed * flops["six_n"] / 1e9 / limit, "runs": results,
        }
    if "tunewright" in runs:
        ours = report["methods"]["tunewright"]["tokens_per_s_median"]
        report["ratios"] = {f"tunewright_vs_{method}": ours / report["methods"][method]["tokens_per_s_median"]
                            for method in runs if method != "tunewright"}
    report["ceiling_tokens_per_s"] = limit * 1e9 / flops["useful"]
    print(json.dumps({k: v for k, v in report.items() if k != "methods"}, indent=1))
    for method, entry in report["methods"].items():
        print(method, {k: v for k, v in entry.items() if k != "runs"})
    save_json(report, args.out)


def target_token_fraction() -> float:
    """Share of real tokens that are targets (where the LM head runs in tunewright)."""
    _, _, examples = load_model_and_examples()
    real = sum(len(e.input_ids) for e in examples)
    return sum(sum(label != -100 for label in e.labels[1:]) for e in examples) / real


if __name__ == "__main__":
    main()
