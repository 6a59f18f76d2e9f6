"""Config sections for what trains and how: adapter, quantization, trainer, preference, tune."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunewright.config_section import Section

AdapterType = Literal["lora", "adalora", "ia3", "loha", "lokr", "prompt_tuning", "prefix_tuning", "full"]


# The adapter types each type-specific key applies to. Setting a key that the chosen type would
# ignore is an error, so a config never looks as if it did something it does not.
ADAPTER_KEYS: dict[str, tuple[str, ...]] = {
    "r": ("lora", "adalora", "loha", "lokr"),
    "alpha": ("lora", "adalora", "loha", "lokr"),
    "dropout": ("lora", "adalora"),
    "target_modules": ("lora", "adalora", "ia3", "loha", "lokr"),
    "bias": ("lora", "adalora"),
    "use_rslora": ("lora",),
    "use_dora": ("lora",),
    "init_r": ("adalora",),
    "tinit": ("adalora",),
    "tfinal": ("adalora",),
    "delta_t": ("adalora",),
    "orth_reg_weight": ("adalora",),
    "feedforward_modules": ("ia3",),
    "rank_dropout": ("loha", "lokr"),
    "module_dropout": ("loha", "lokr"),
    "decompose_factor": ("lokr",),
    "num_virtual_tokens": ("prompt_tuning", "prefix_tuning"),
    "prompt_init_text": ("prompt_tuning",),
    "prefix_projection": ("prefix_tuning",),
    "trainable_layers": ("full",),
    "trainable_modules": ("full",),
}


class AdapterConfig(Section):
    """What trains: a peft adapter (mapped onto peft in adapters.py) or the model's own weights (`full`)."""

    type: AdapterType = Field(
        "lora",
        description="`lora`, `adalora`, `ia3`, `loha`, `lokr`, `prompt_tuning`, `prefix_tuning`, or `full` "
        "(no adapter: train the model's weights, optionally only some layers).",
    )
    r: int = Field(8, ge=1, description="Rank (lora, loha, lokr); adalora: average rank kept after pruning.")
    alpha: float = Field(16, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="lora/adalora: dropout on the adapter's input "
                           "(on CPU, rounded to a multiple of 1/65536: kernels/cpu_training.py).")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="Module names to adapt, or `all-linear`. By default every linear layer but the output "
        "layer for lora, loha and lokr (it beat the q/v projections on every task in docs/recipes.md); per "
        "architecture for adalora (the attention q/v projections) and ia3 (key/value and down projections).",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="lora/adalora: which biases train.")
    use_rslora: bool = Field(False, description="lora: rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="lora: weight-decomposed LoRA (DoRA).")
    init_r: int = Field(12, ge=1, description="adalora: rank of every module before pruning.")
    tinit: int = Field(0, ge=0, description="adalora: warmup steps before ranks are pruned.")
    tfinal: int = Field(0, ge=0, description="adalora: final steps trained with the ranks fixed.")
    delta_t: int = Field(1, ge=1, description="adalora: steps between two rank re-allocations.")
    orth_reg_weight: float = Field(0.5, ge=0, description="adalora: weight of the orthogonality penalty.")
    feedforward_modules: list[str] | None = Field(
        None, description="ia3: targets scaled at their input (feed-forward); default per architecture."
    )
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="loha/lokr: dropout on each rank of the update.")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="loha/lokr: chance of skipping the adapter.")
    decompose_factor: int = Field(-1, description="lokr: Kronecker factor size (-1: the most square split).")
    num_virtual_tokens: int = Field(16, ge=1, description="prompt/prefix tuning: number of learned tokens.")
    prompt_init_text: str | None = Field(
        None, description="prompt_tuning: initialise the virtual tokens from this text (default: random)."
    )
    prefix_projection: bool = Field(False, description="prefix_tuning: learn the prefix through an MLP.")
    trainable_layers: list[int] | None = Field(
        None,
        description="full: indices of the decoder layers to train (negative: from the end); the rest are "
        "frozen. Null (and no trainable_modules): every weight trains.",
    )
    trainable_modules: list[str] | None = Field(
        None,
        description="full: regular expressions; parameters whose name matches one also train "
        "(e.g. 'lm_head', 'model\\.norm').",
    )

    @model_validator(mode="after")
    def _keys_apply_to_type(self) -> AdapterConfig:
        # A key left at its default is fine: resolved configs (saved with every run) hold every key.
        for key in sorted(self.model_fields_set):
            applies_to = ADAPTER_KEYS.get(key)
            default = type(self).model_fields[key].default
            if applies_to is not None and self.type not in applies_to and getattr(self, key) != default:
                raise ValueError(
                    f"'{key}' does not apply to type '{self.type}' (only to {', '.join(applies_to)}); "
                    "remove it"
                )
        if self.type == "adalora" and self.r > self.init_r:
            message = f"r ({self.r}) is the rank kept after pruning; it cannot exceed init_r ({self.init_r})"
            raise ValueError(message)
        return self

    @property
    def is_prompt_learning(self) -> bool:
        """Virtual tokens (prompt/prefix tuning): nothing to merge into the weights."""
        return self.type in ("prompt_tuning", "prefix_tuning")


class QuantizationConfig(Section):
    """QLoRA: the frozen base model is loaded in 4 or 8 bits through bitsandbytes (CUDA only)."""

    bits: Literal[4, 8] = Field(4, description="Load the base model in 4 or 8 bits (bitsandbytes, CUDA only).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4 bits only: the 4-bit data type.")
    double_quant: bool = Field(True, description="4 bits only: quantize the quantization constants too.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="4 bits only: dtype of the matmuls on dequantized weights."
    )

    @model_validator(mode="after")
    def _four_bit_keys(self) -> QuantizationConfig:
        defaults = type(self).model_fields
        changed = {key for key in self.model_fields_set if getattr(self, key) != defaults[key].default}
        four_bit_only = sorted({"quant_type", "double_quant", "compute_dtype"} & changed)
        if self.bits == 8 and four_bit_only:
            raise ValueError(f"'{four_bit_only[0]}' applies to bits 4 only; remove it or set bits: 4")
        return self


# The arguments each schedule takes besides warmup and length (transformers.get_scheduler's scheduler_specific_kwargs).
SCHEDULE_KWARGS: dict[str, tuple[str, ...]] = {
    "constant": (), "linear": (), "cosine": ("num_cycles",), "cosine_with_restarts": ("num_cycles",),
    "warmup_stable_decay": ("num_decay_steps", "num_stable_steps", "min_lr_ratio", "decay_type", "warmup_type"),
}


# trainer.eval_metric: whether each metric is better `max` or `min`, and the output types that report it.
# `loss` and `token_accuracy` come from the teacher-forced pass over every validation row; the others
# generate (or score labels) on the first trainer.eval_max_rows validation rows.
EVAL_METRICS: dict[str, tuple[Literal["max", "min"], tuple[str, ...]]] = {
    "loss": ("min", ("text", "category")),
    "token_accuracy": ("max", ("text",)),
    "exact_match": ("max", ("text",)),
    "bleu": ("max", ("text",)),
    "rouge_l": ("max", ("text",)),
    "char_error_rate": ("min", ("text",)),
    "generated_token_accuracy": ("max", ("text",)),
    "accuracy": ("max", ("category",)),
    "macro_f1": ("max", ("category",)),
}
TEACHER_FORCED_METRICS = ("loss", "token_accuracy")
EvalMetric = Literal["loss", "token_accuracy", "exact_match", "bleu", "rouge_l", "char_error_rate",
                     "generated_token_accuracy", "accuracy", "macro_f1"]


class TrainerConfig(Section):
    type: Literal["finetune", "none", "dpo", "orpo", "simpo", "kto"] = Field(
        "finetune", description="`finetune` trains; `none` is zero-shot (nothing is trained or saved); `dpo`, "
        "`orpo`, `simpo` and `kto` tune on preferences (see the preference section)."
    )
    epochs: int = Field(3, ge=1, description="Passes over the training split (ignored when max_steps or "
                        "time_budget is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    time_budget: float | None = Field(
        None, gt=0, description="Seconds of training instead of a step count (replaces epochs; not with max_steps). "
        "The first optimizer steps are timed (not the first, which pays warm-up), and one validation if there "
        "are validation rows; the step count is then fixed so that the steps and the scheduled validations end "
        "within the budget (loading, tokenising and the final metrics are not counted), and checked again every "
        "tenth of the run at the recent pace, since machines slow down. The learning-rate schedule runs over "
        "that count (the timed steps follow a 1,000-step one); the count is logged, recorded in metrics.json "
        "(training.time_budget) and kept by --resume."
    )
    batch_size: int = Field(4, ge=1, description="Samples per micro-batch.")
    eval_batch_size: int | None = Field(None, ge=1, description="Samples per evaluation batch (default batch_size).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float | None = Field(
        None, gt=0, description="Peak learning rate. Null (the default): by what trains, 1e-3 for a peft adapter "
        "(every adapter.type but full) and 2e-5 for full fine-tuning (adapter.type full, or no adapter section); "
        "a run's saved config records the rate it used."
    )
    lr_scheduler: Literal["constant", "linear", "cosine", "cosine_with_restarts", "warmup_stable_decay"] = Field(
        "linear", description="The learning-rate schedule after warmup (transformers' get_scheduler): hold "
        "`constant`, decay to zero `linear`ly or as a `cosine`, cosine decay `with_restarts` "
        "(lr_scheduler_kwargs.num_cycles), or `warmup_stable_decay` (hold, then decay over the last "
        "lr_scheduler_kwargs.num_decay_steps steps; default: the last 10%)."
    )
    lr_scheduler_kwargs: dict[str, float | int | str] = Field(
        default_factory=dict, description="Extra arguments of the schedule, by transformers' names "
        "(num_cycles, num_decay_steps, num_stable_steps, min_lr_ratio, decay_type)."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps spent warming up linearly (the "
                                "5% of the recipe measured in docs/recipes.md; ignored when warmup_steps is set).")
    warmup_steps: int | None = Field(
        None, ge=0, description="Warm up linearly over this many optimizer steps (instead of warmup_ratio)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm (null: no clipping).")
    regularization: Literal["l1", "l2", "l1_l2"] | None = Field(
        None, description="Extra penalty on trainable weights added to the loss."
    )
    regularization_lambda: float = Field(0.01, ge=0, description="Weight of the regularization penalty.")
    eval_every: int | None = Field(
        None, ge=1, description="Validate every N optimizer steps (default: each epoch)."
    )
    eval_metric: EvalMetric = Field(
        "loss", description="The validation metric that early stopping and the kept best weights follow: "
        "`loss` or `token_accuracy` (every validation row, teacher forced); for text outputs `exact_match`, "
        "`bleu`, `rouge_l`, `char_error_rate` or `generated_token_accuracy`, and for category outputs "
        "`accuracy` or `macro_f1` (generated or label-scored on the first eval_max_rows validation rows)."
    )
    eval_max_rows: int = Field(
        200, ge=1, description="With a generated eval_metric: the first N validation rows are generated at each "
        "validation (the validation loss still covers every row)."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations without a better eval_metric."
    )
    seed: int = Field(42, description="Seed for weights, shuffling and dropout.")
    log_every: int = Field(1, ge=1, description="Write a training-log line every N optimizer steps.")
    checkpoint_steps: int | None = Field(
        100, ge=1, description="Save a resumable checkpoint every N optimizer steps (null: only when "
        "interrupted by SIGTERM or Ctrl-C)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many of the newest checkpoints are kept.")
    on_nonfinite: Literal["stop", "skip_batch"] = Field(
        "stop", description="A NaN/infinite loss or gradient: `stop` the run (the last checkpoint stays), or "
        "`skip_batch`: drop that optimizer step and go on."
    )
    max_skipped_steps: int = Field(
        10, ge=1, description="With on_nonfinite skip_batch: stop once this many steps were skipped."
    )
    halve_batch_on_oom: bool = Field(
        False, description="On out-of-memory in a step, halve the micro-batch and double gradient accumulation "
        "(same effective batch and loss) and retry; one process only."
    )
    packing: bool = Field(
        True, description="Pack each micro-batch's samples into one row (positions restart per sample, "
        "attention stays within each sample) instead of padding them; same loss, no wasted tokens."
    )
    group_by_length: bool = Field(
        False, description="Without packing: batch samples of similar length together to cut padding."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Training math: `auto` is bf16 autocast on CUDA with bf16 and on CPUs with native "
        "bf16 matmuls (AVX512-BF16/AMX), else fp32 (emulated bf16 is slower than fp32). In bf16, frozen weights "
        "are held in bf16 while training (trainable ones stay fp32) and restored to fp32 after."
    )
    gradient_checkpointing: bool | Literal["offload"] = Field(
        False, description="Recompute activations in the backward pass: less memory, about 30% more compute. "
        "`offload` also keeps the activations saved for the backward pass in CPU memory (pinned on CUDA) until "
        "they are needed."
    )
    batch_tokens: int | None = Field(
        None, ge=1, description="Token budget of a micro-batch: each optimizer step's samples are cut into "
        "micro-batches of at most this many tokens (a longer sample goes alone) instead of batch_size samples; "
        "the loss is the same, only the memory and the number of forward passes change."
    )
    fused_loss: Literal["auto", "liger", "chunked"] = Field(
        "auto", description="The LM-head cross-entropy that never holds the logits: `liger` (Liger's Triton kernel, "
        "CUDA, `pip install 'tunewright[liger]'`), `chunked` (tunewright's own, any device), or `auto`: Liger on "
        "CUDA when installed, else chunked. Where Liger cannot run, chunked is used with one warning."
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer for training (the first steps compile; pays on "
        "CUDA at thousands of steps)."
    )

    @property
    def peak_learning_rate(self) -> float:
        """learning_rate; null only in a trainer section used on its own (fit() called directly, not through a
        whole config, which resolves it by adapter): that trains an adapter."""
        return self.learning_rate if self.learning_rate is not None else ADAPTER_LEARNING_RATE

    @model_validator(mode="after")
    def _schedule_keys(self) -> TrainerConfig:
        if self.warmup_steps is not None and "warmup_ratio" in self.model_fields_set and self.warmup_ratio > 0:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        if self.max_steps is not None and self.time_budget is not None:
            raise ValueError("set max_steps or time_budget, not both")
        allowed = SCHEDULE_KWARGS[self.lr_scheduler]
        for key in self.lr_scheduler_kwargs:
            if key not in allowed:
                raise ValueError(
                    f"lr_scheduler_kwargs.{key} is not an argument of the {self.lr_scheduler} schedule "
                    f"(it takes: {', '.join(allowed) or 'none'})"
                )
        return self


# trainer.learning_rate left null: the peak learning rate by what trains. A LoRA adapter on the default
# model learns far better at 1e-3 than at 2e-4 (docs/recipes.md); full fine-tuning needs far less.
ADAPTER_LEARNING_RATE = 1e-3
FULL_FINE_TUNING_LEARNING_RATE = 2e-5


def default_learning_rate(adapter: AdapterConfig | None) -> float:
    """The peak learning rate for what trains: no adapter section (or type full) is full fine-tuning."""
    return FULL_FINE_TUNING_LEARNING_RATE if adapter is None or adapter.type == "full" else ADAPTER_LEARNING_RATE


PREFERENCE_TRAINERS = ("dpo", "orpo", "simpo", "kto")
# The preference keys each trainer uses; setting one another trainer would ignore is an error.
PREFERENCE_KEYS: dict[str, tuple[str, ...]] = {
    "loss_type": ("dpo",), "simpo_gamma": ("simpo",), "orpo_lambda": ("orpo",), "reference": ("dpo", "kto"),
    "cache_reference": ("dpo",), "rejected_column": ("dpo", "orpo", "simpo"), "label_column": ("kto",),
    "kto_desirable_weight": ("kto",), "kto_undesirable_weight": ("kto",), "format": ("dpo", "orpo", "simpo"),
}


class PreferenceConfig(Section):
    """Preference tuning (trainer.type dpo/orpo/simpo/kto): input features make the prompt, the output the chosen.

    The output feature holds the chosen response (KTO: the completion); rejected_column the rejected one.
    """

    format: Literal["columns", "hh_rlhf"] = Field(
        "columns", description="`columns`: the prompt, chosen and rejected columns as they are; `hh_rlhf`: the "
        "chosen and rejected columns hold whole transcripts (`\\n\\nHuman:` / `\\n\\nAssistant:`), split into "
        "their shared prefix (the prompt, the single input feature) and the two final assistant replies; a pair "
        "whose prefixes differ is dropped and counted."
    )
    rejected_column: str = Field("rejected", description="dpo/orpo/simpo: the column of the rejected response.")
    label_column: str = Field("label", description="kto: the boolean column saying the completion is desirable.")
    beta: float = Field(0.1, gt=0, description="Strength of the preference: dpo/kto the KL weight, simpo the "
                        "reward scale (the SimPO paper uses 2 to 2.5).")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="dpo: `sigmoid` (DPO), `ipo` (IPO, length-normalised) or `hinge` (SLiC)."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin gamma.")
    orpo_lambda: float = Field(0.1, gt=0, description="orpo: weight of the odds-ratio term next to the NLL.")
    kto_desirable_weight: float = Field(1.0, gt=0, description="kto: weight of desirable rows' losses.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable rows' losses.")
    reference: str | None = Field(
        None, description="dpo/kto: the reference model, a run folder or model folder; by default the policy "
        "with its adapter disabled (a fresh adapter), or the --from-run run's model."
    )
    cache_reference: bool = Field(
        True, description="dpo: compute the reference log-probs once per dataset and keep them beside the "
        "run (reused by later runs and --resume; invalidated when data, tokenizer, template or reference change)."
    )
    max_length: int = Field(
        1024, ge=2, description="Most tokens of prompt plus response: the prompt loses its start first; a "
        "response that does not fit is never cut, its pair is dropped and counted."
    )


TuneValue = bool | int | float | str | list[str] | None  # what a categorical choice may be (a setting's value)


class TuneRange(Section):
    """One searched setting: a number range (`low`, `high`, `log`) or a list of `choices`."""

    low: int | float | None = Field(None, description="Smallest value tried (integers when low and high are both "
                                    "integers).")
    high: int | float | None = Field(None, description="Largest value tried.")
    log: bool = Field(False, description="Sample on a log scale (learning rates); low must be above 0.")
    choices: list[TuneValue] | None = Field(None, min_length=1, description="The values tried, instead of a range.")

    @model_validator(mode="after")
    def _range_or_choices(self) -> TuneRange:
        if (self.choices is None) == (self.low is None and self.high is None):
            raise ValueError("give either low and high (a range) or choices (a list), not both or neither")
        if self.choices is not None:
            if self.log:
                raise ValueError("log applies to a low/high range only; remove it")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low above 0 (got {self.low})")
        return self

    @property
    def is_integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


class TuneConfig(Section):
    """`tunewright tune`: the settings it searches; `tunewright train` ignores this section."""

    space: dict[str, TuneRange] = Field(
        min_length=1, description="Dotted key path of a setting (`trainer.learning_rate`, `adapter.r`) -> its "
        "range `{low, high, log}` or `{choices: [...]}`."
    )
    metric: EvalMetric | None = Field(
        None, description="The validation metric optimised and pruned on (default: trainer.eval_metric); "
        "maximised or minimised as trainer.eval_metric documents."
    )
