"""TunedModel: a loaded model + tokenizer + resolved config, with batched predict/generate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunewright.config import GenerationSettings, TunewrightConfig
from tunewright.data import encode_prompts, fit_prompts, render_prompts
from tunewright.generate import generate_texts
from tunewright.model import max_input_length

PREDICTION_COLUMN = "prediction"


@dataclass
class TunedModel:
    """What `tunewright.load` returns: everything needed to predict, evaluate, serve or export."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    config: TunewrightConfig

    @property
    def max_input_len(self) -> int:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return max_input_length(base, self.config.generation.max_new_tokens, self.config.preprocessing.max_input_length)

    def encode_texts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Rendered prompts -> token ids, truncated (never dropped) to the maximum input length."""
        ids = encode_prompts(prompts, self.tokenizer, self.config.prompt.use_chat_template)
        kept, _ = fit_prompts(ids, self.max_input_len, "truncate")
        return kept

    def encode_frame(self, frame: pd.DataFrame) -> list[list[int]]:
        return self.encode_texts(render_prompts(frame, self.config))

    def generate(self, prompts: Sequence[str], settings: GenerationSettings | None = None,
                 show_progress: bool = False) -> list[str]:
        """Complete already-rendered prompt texts."""
        settings = settings or self.config.generation
        return generate_texts(self.model, self.tokenizer, self.encode_texts(prompts), settings, show_progress)

    def predict(self, frame: pd.DataFrame, show_progress: bool = False) -> pd.DataFrame:
        """The input rows with a `prediction` column added."""
        ids = self.encode_frame(frame)
        texts = generate_texts(self.model, self.tokenizer, ids, self.config.generation, show_progress)
        result = frame.copy()
        result[PREDICTION_COLUMN] = texts
        return result
