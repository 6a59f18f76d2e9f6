"""Multi-turn chat fine-tuning on real data: assistant-token loss of smollm2-135m before and after LoRA.

Trains on the `chosen` conversations of ../shared/data/hh-rlhf-harmless/train.jsonl (raw transcripts with
"\\n\\nHuman:" / "\\n\\nAssistant:" markers, read as conversation.format auto -> transcript), with the
tokenizer's own chat template and every assistant turn trained (EOS included). The loss is the mean
cross-entropy over the trained (assistant) tokens of test.jsonl's `chosen` conversations, masked exactly as
in training, for the base model (zero-shot) and for the trained run.

    flock /tmp/tunewright-bench.lock .venv/bin/python bench/chat_hh_rlhf.py [--train-rows N] [--test-rows N] \\
        --out bench/results/chat_hh_rlhf_<machine>.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import tunewright
from tunewright.chat_data import conversation_examples, frame_conversations
from tunewright.data import read_table
from tunewright.objective import LanguageModelObjective, evaluate_loss
from tunewright.predictor import TunedModel

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless"


def config(args: argparse.Namespace, trainer: dict[str, Any]) -> dict[str, Any]:
    return {
        "base_model": "smollm2-135m",
        "conversation": {"column": "chosen"},
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "trainer": trainer,
        "preprocessing": {"split": [1.0, 0.0, 0.0], "max_input_length": args.max_len},
    }


def assistant_loss(tuned: TunedModel, frame: Any) -> dict[str, float]:
    """Mean loss over every trained (assistant) token of the conversations, as training masks them."""
    assert tuned.config.conversation is not None
    conversations = frame_conversations(frame, tuned.config.conversation, "test.jsonl")
    examples, stats = conversation_examples(tuned.tokenizer, conversations, tuned.config, tuned.max_sequence_len)
    started = time.perf_counter()
    metrics = evaluate_loss(LanguageModelObjective(tuned.model), examples, 8, tuned.tokenizer.pad_token_id)
    return {**metrics, "rows": len(examples), "assistant_tokens": stats.trained_tokens,
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--test-rows", type=int, default=300)
    parser.add_argument("--max-len", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    train = read_table(DATA / "train.jsonl").sample(n=args.train_rows, random_state=0)[["chosen"]]
    test = read_table(DATA / "test.jsonl").head(args.test_rows)[["chosen"]]
    trainer = {"epochs": args.epochs, "batch_size": 8, "learning_rate": 5e-4, "warmup_ratio": 0.05,
               "lr_scheduler": "cosine", "checkpoint_steps": None, "log_every": 5}
    before = assistant_loss(tunewright.from_config(config(args, {"type": "none"})), test)
    print(f"before: loss {before['loss']:.4f} over {before['assistant_tokens']:,} assistant tokens", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        result = tunewright.train(config(args, trainer), train.reset_index(drop=True), Path(scratch) / "run",
                                  show_progress=False)
        train_seconds = time.perf_counter() - started
        after = assistant_loss(result.model, test)
    print(f"after: loss {after['loss']:.4f} ({train_seconds:.0f} s of training)", flush=True)
    report = {
        "benchmark": "chat_hh_rlhf", "base_model": "smollm2-135m", "train_rows": args.train_rows,
        "test_rows": args.test_rows, "max_len": args.max_len, "epochs": args.epochs,
        "steps": result.metrics["training"]["steps"], "train_seconds": train_seconds,
        "before": before, "after": after, "loss_ratio_after_before": after["loss"] / before["loss"],
        "command": "flock /tmp/tunewright-bench.lock .venv/bin/python bench/chat_hh_rlhf.py "
                   f"--train-rows {args.train_rows} --test-rows {args.test_rows} --max-len {args.max_len} "
                   f"--epochs {args.epochs} --out {args.out}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
