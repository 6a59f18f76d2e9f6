"""Adapters: map the config's adapter section onto peft in one place, and report what trains."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from tunewright.config import AdapterConfig

log = logging.getLogger(__name__)

# Attention projections adapted by default, per architecture (model_type in config.json).
DEFAULT_TARGET_MODULES = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}


@dataclass
class ParameterReport:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({100 * self.fraction:.4f}%)"


def count_parameters(model: nn.Module) -> ParameterReport:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return ParameterReport(trainable=trainable, total=total)


def target_modules_for(model: PreTrainedModel, adapter: AdapterConfig) -> list[str] | str:
    if adapter.target_modules is not None:
        return adapter.target_modules
    return DEFAULT_TARGET_MODULES.get(model.config.model_type, "all-linear")


def peft_config_for(model: PreTrainedModel, adapter: AdapterConfig) -> LoraConfig:
    """The one place where our adapter schema becomes a peft config."""
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=target_modules_for(model, adapter),
        bias=adapter.bias,
    )


def attach_adapter(model: PreTrainedModel, adapter: AdapterConfig | None) -> nn.Module:
    """Wrap the model with a fresh adapter, or unfreeze everything for full fine-tuning."""
    if adapter is None:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        wrapped: nn.Module = model
    else:
        wrapped = get_peft_model(model, peft_config_for(model, adapter))
    log.info("%s", count_parameters(wrapped))
    return wrapped


def load_adapter(model: PreTrainedModel, adapter_dir: str, trainable: bool = False) -> PeftModel:
    """Attach a saved peft adapter (from a run folder) to the base model."""
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
