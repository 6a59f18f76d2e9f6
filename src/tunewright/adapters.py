"""Adapters: map the config's adapter section onto peft in one place, and report what trains.

Every adapter type becomes a peft config in `peft_config_for`; `attach_adapter` wraps the model
(or, for full fine-tuning, chooses which of its own weights train). AdaLoRA is the one type that
needs the training loop's help: `optimizer_step_hook` re-allocates its ranks after every step, and
`adapter_penalty` is its orthogonality term, added to the loss by the objective.
"""

from __future__ import annotations

import difflib
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from tunewright.config import AdapterConfig
from tunewright.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

# AdaLoRA's default: the attention projections, per architecture (model_type in config.json). Over every
# linear layer its rank budget prunes some layers to rank 0, which peft then cannot save.
ADALORA_TARGET_MODULES = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}
# IA3 scales keys, values and the feed-forward output; (target_modules, feedforward_modules).
# The feed-forward module is scaled at its input, as in the IA3 paper.
DEFAULT_IA3_MODULES = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi3": (["qkv_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
}
StepHook = Callable[[int, int], None]
# Layer types peft's adapters can wrap; a target naming only other modules (a whole MLP block) fails in peft.
ADAPTABLE_LAYERS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)
LAYER_NAMES_SHOWN = 12


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
    """Trainable and total parameters (tied weights counted once, virtual-token tables included)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return ParameterReport(trainable=trainable, total=total)


def target_modules_for(model: PreTrainedModel, adapter: AdapterConfig) -> list[str] | str:
    if adapter.target_modules is not None:
        return adapter.target_modules
    if adapter.type == "adalora":
        return ADALORA_TARGET_MODULES.get(model.config.model_type, "all-linear")
    # Every linear layer: it beat the q/v projections on every task measured (docs/recipes.md).
    return "all-linear"


def _ia3_modules(model: PreTrainedModel, adapter: AdapterConfig) -> tuple[list[str] | str, list[str]]:
    default_targets, default_feedforward = DEFAULT_IA3_MODULES.get(
        model.config.model_type, ("all-linear", [])
    )
    targets = adapter.target_modules if adapter.target_modules is not None else default_targets
    if adapter.feedforward_modules is not None:
        outside = [name for name in adapter.feedforward_modules if not isinstance(targets, str) and name not in targets]
        if outside:  # peft requires a subset, and says so in a traceback
            raise ConfigError(
                f"adapter.feedforward_modules: '{outside[0]}' is not one of adapter.target_modules "
                f"({', '.join(targets)}); list it there too"
            )
        return targets, adapter.feedforward_modules
    # Only default feed-forward modules that are actually targeted (peft requires a subset).
    if isinstance(targets, str):
        return targets, []
    return targets, [name for name in default_feedforward if name in targets]


def _adaptable_leaf_names(modules: dict[str, nn.Module]) -> list[str]:
    """Distinct last name parts of the layers an adapter can wrap (q_proj, down_proj, lm_head, ...)."""
    names = [name.rsplit(".", 1)[-1] for name, module in modules.items() if isinstance(module, ADAPTABLE_LAYERS)]
    return list(dict.fromkeys(name for name in names if name))


def _target_problem(entry: str, modules: dict[str, nn.Module], key: str) -> str | None:
    """Why one target_modules entry would not adapt anything, or None when it names adaptable layers.

    Matching is peft's: a module name equal to the entry or ending in `.entry`.
    """
    matched = [module for name, module in modules.items() if name == entry or name.endswith(f".{entry}")]
    leaves = _adaptable_leaf_names(modules)
    if not matched:
        close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], leaves, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"its layers: {', '.join(leaves[:LAYER_NAMES_SHOWN])}"
        return f"{key}: '{entry}' matches no module of the model ({hint})"
    if not any(isinstance(module, ADAPTABLE_LAYERS) for module in matched):
        inside = _adaptable_leaf_names({name: m for module in matched for name, m in module.named_modules()})
        kind = type(matched[0]).__name__
        return (f"{key}: '{entry}' names {kind} blocks, which cannot hold an adapter; name the layers inside: "
                f"{', '.join(inside[:LAYER_NAMES_SHOWN]) or 'none'}")
    return None


def check_target_modules(model: nn.Module, peft_config: PeftConfig) -> None:
    """Every target_modules (and IA3 feedforward_modules) entry must name layers of this model.

    peft skips names that match nothing as long as one other name does, and fails with a long
    traceback when none does; checking first gives one line naming the entry, with a did-you-mean.

    Raises:
        ModelLoadError: an entry matches no module, or only modules that cannot hold an adapter.
    """
    modules = dict(model.named_modules())
    for key in ("target_modules", "feedforward_modules"):
        entries = getattr(peft_config, key, None)
        if not entries or isinstance(entries, str):  # 'all-linear': peft picks the layers itself
            continue
        for entry in sorted(entries):
            problem = _target_problem(entry, modules, f"adapter.{key}")
            if problem is not None:
                raise ModelLoadError(problem)


def peft_config_for(
    model: PreTrainedModel, adapter: AdapterConfig, total_steps: int | None = None
) -> PeftConfig:
    """The one place where our adapter schema becomes a peft config.

    Args:
        model: the base model (its architecture picks the default target modules).
        adapter: the adapter section; `type` must not be `full`.
        total_steps: optimizer steps of the training run (AdaLoRA's rank budget schedule needs it).

    Raises:
        ConfigError: AdaLoRA's tinit + tfinal leave no steps for pruning.
    """
    if adapter.type == "lora":
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=adapter.r,
            lora_alpha=adapter.alpha,  # type: ignore[arg-type]  # peft annotates int; it divides by r
            lora_dropout=adapter.dropout,
            target_modules=target_modules_for(model, adapter),
            bias=adapter.bias,
            use_rslora=adapter.use_rslora,
            use_dora=adapter.use_dora,
        )
    if adapter.type == "adalora":
        total = total_steps or 1
        if adapter.tinit + adapter.tfinal >= total:
            raise ConfigError(
                f"adapter: tinit ({adapter.tinit}) + tfinal ({adapter.tfinal}) leave none of the {total} "
                "training steps for AdaLoRA's rank pruning; lower them or train longer"
            )
        return AdaLoraConfig(
            task_type="CAUSAL_LM",
            init_r=adapter.init_r,
            target_r=adapter.r,
            lora_alpha=adapter.alpha,  # type: ignore[arg-type]
            lora_dropout=adapter.dropout,
            target_modules=target_modules_for(model, adapter),
            bias=adapter.bias,
            tinit=adapter.tinit,
            tfinal=adapter.tfinal,
            deltaT=adapter.delta_t,
            orth_reg_weight=adapter.orth_reg_weight,
            total_step=total,
        )
    if adapter.type == "ia3":
        targets, feedforward = _ia3_modules(model, adapter)
        return IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward)
    if adapter.type in ("loha", "lokr"):
        common: dict[str, Any] = {
            "task_type": "CAUSAL_LM",
            "r": adapter.r,
            "alpha": adapter.alpha,
            "rank_dropout": adapter.rank_dropout,
            "module_dropout": adapter.module_dropout,
            "target_modules": target_modules_for(model, adapter),
        }
        if adapter.type == "loha":
            return LoHaConfig(**common)
        return LoKrConfig(**common, decompose_factor=adapter.decompose_factor)
    if adapter.type == "prompt_tuning":
        text_init: dict[str, Any] = {
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": adapter.prompt_init_text,
            "tokenizer_name_or_path": model.name_or_path,
        }
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=adapter.num_virtual_tokens,
            **(text_init if adapter.prompt_init_text is not None else {}),
        )
    if adapter.type == "prefix_tuning":
        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=adapter.num_virtual_tokens,
            prefix_projection=adapter.prefix_projection,
        )
    raise ValueError(f"adapter type {adapter.type!r} has no peft config")  # `full` never gets here


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The stack of decoder blocks (model.model.layers for Llama-likes)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"adapter.trainable_layers: no decoder layers found in a '{model.config.model_type}' model; "
            "use adapter.trainable_modules (parameter-name patterns) instead"
        )
    return layers


def freeze_except(model: PreTrainedModel, adapter: AdapterConfig | None) -> None:
    """Full fine-tuning: train every weight, or only the chosen decoder layers and name patterns.

    Raises:
        ConfigError: a layer index is out of range, or a pattern matches no parameter.
    """
    if adapter is None or (adapter.trainable_layers is None and adapter.trainable_modules is None):
        model.requires_grad_(True)
        return
    chosen: set[int] = set()
    if adapter.trainable_layers is not None:
        count = len(decoder_layers(model))
        for index in adapter.trainable_layers:
            if not -count <= index < count:
                raise ConfigError(
                    f"adapter.trainable_layers: layer {index} does not exist (the model has {count})"
                )
            chosen.add(index % count)
    model.requires_grad_(False)
    layers = decoder_layers(model) if chosen else nn.ModuleList()
    for index in sorted(chosen):
        layers[index].requires_grad_(True)
    for pattern in adapter.trainable_modules or []:
        matched = [p for name, p in model.named_parameters() if re.search(pattern, name)]
        if not matched:
            raise ConfigError(
                f"adapter.trainable_modules: '{pattern}' matches no parameter name of the model "
                "(a tied lm_head is listed as model.embed_tokens)"
            )
        for parameter in matched:
            parameter.requires_grad_(True)


def attach_adapter(
    model: PreTrainedModel, adapter: AdapterConfig | None, total_steps: int | None = None
) -> nn.Module:
    """Wrap the model with a fresh adapter, or choose the weights that train for full fine-tuning.

    Args:
        model: the loaded base model.
        adapter: the adapter section; None or type `full` trains the model's own weights.
        total_steps: optimizer steps planned (AdaLoRA needs them).
    """
    if adapter is None or adapter.type == "full":
        freeze_except(model, adapter)
        wrapped: nn.Module = model
    else:
        if getattr(model, "is_quantized", False):
            from peft import prepare_model_for_kbit_training  # QLoRA only

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        peft_config = peft_config_for(model, adapter, total_steps)
        check_target_modules(model, peft_config)
        with peft_deprecations_quiet():
            wrapped = get_peft_model(model, peft_config)
    log.info("%s", count_parameters(wrapped))
    return wrapped


@contextmanager
def peft_deprecations_quiet() -> Iterator[None]:
    """peft reads `model.is_gradient_checkpointing`, which transformers 5.25 deprecates with a FutureWarning
    on every wrap; the user can do nothing about it, so it is silenced here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_adapter(model: PreTrainedModel, adapter_dir: str, trainable: bool = False) -> PeftModel:
    """Attach a saved peft adapter (from a run folder) to the base model."""
    with warnings.catch_warnings(), peft_deprecations_quiet():
        # AdaLoRA saves its pruned ranks as rank_pattern keyed by lora_E names; peft's generic
        # target check misreads those keys and warns, while its loader does resize by them.
        warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)


def _adalora_model(model: nn.Module) -> Any:
    """The AdaLoraModel inside a peft wrapper, if that is the adapter being trained."""
    base = getattr(model, "base_model", None)
    return base if base is not None and hasattr(base, "update_and_allocate") else None


def optimizer_step_hook(model: nn.Module) -> StepHook | None:
    """What the training loop must call after each optimizer step (before zero_grad), if anything.

    AdaLoRA re-allocates its rank budget from the gradients' importance scores; its schedule runs
    over the loop's exact number of steps, which the hook receives.
    """
    adalora = _adalora_model(model)
    if adalora is None:
        return None

    def update_ranks(step: int, total_steps: int) -> None:
        for peft_config in adalora.peft_config.values():
            peft_config.total_step = total_steps
        adalora.update_and_allocate(step)

    return update_ranks


def adapter_penalty(model: nn.Module) -> torch.Tensor | None:
    """AdaLoRA's orthogonality penalty on P and Q (mean ‖PPᵀ − I‖_F over matrices), times its weight.

    peft adds it inside AdaLoraModel.forward only when the model computes the loss itself; our
    objective computes the loss on target positions only, so it adds this term explicitly.
    """
    adalora = _adalora_model(model)
    if adalora is None:
        return None
    name = adalora.trainable_adapter_name
    weight = adalora.peft_config[name].orth_reg_weight
    norms = []
    for parameter_name, parameter in adalora.model.named_parameters():
        if ("lora_A" in parameter_name or "lora_B" in parameter_name) and name in parameter_name:
            product = parameter @ parameter.T if "lora_A" in parameter_name else parameter.T @ parameter
            identity = torch.eye(product.shape[0], device=product.device, dtype=product.dtype)
            norms.append(torch.linalg.matrix_norm(product - identity))
    if not norms or weight == 0:
        return None
    penalty: torch.Tensor = weight * torch.stack(norms).mean()
    return penalty




def uses_virtual_tokens(model: nn.Module) -> bool:
    """Prompt/prefix tuning prepend virtual tokens inside peft's own forward; it must not be bypassed."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return False
    return any(getattr(cfg, "is_prompt_learning", False) for cfg in peft_config.values())
