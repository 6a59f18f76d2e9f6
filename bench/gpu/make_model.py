"""A model of SmolLM2-1.7B's shape with random weights (bf16) and SmolLM2's tokenizer, for GPU speed runs.

    python bench/gpu/make_model.py OUT_DIR TOKENIZER_DIR
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

SHAPE = {"vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
         "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 8192,
         "rope_theta": 130000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}


def main(out: Path, tokenizer_dir: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    print("params", sum(p.numel() for p in model.parameters()))
    model.save_pretrained(out)
    with gzip.open(tokenizer_dir / "tokenizer.json.gz", "rb") as packed, open(out / "tokenizer.json", "wb") as plain:
        shutil.copyfileobj(packed, plain)
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
