"""The config schema: one pydantic class per YAML section, and the only place defaults live."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from tunewright.config_messages import SETTING_ERROR, describe, section_class, unknown_key_hint
from tunewright.config_yaml import read_yaml
from tunewright.errors import ConfigError
from tunewright.prompt import default_template, template_fields

DEFAULT_BASE_MODEL = "smollm2-135m"


Location = tuple[str | int, ...]


def refuse(title: str, problems: list[tuple[Location, str]]) -> None:
    """Report several cross-field problems at once, each at its own key path (relative to the section)."""
    if problems:
        details = [
            InitErrorDetails(type=PydanticCustomError(SETTING_ERROR, "{message}", {"message": message}),
                             loc=location, input=None)
            for location, message in problems
        ]
        raise ValidationError.from_exception_data(title, details)


def changed(section: BaseModel, key: str) -> bool:
    """The key holds something other than its default (resolved configs hold every key)."""
    return bool(getattr(section, key) != type(section).model_fields[key].get_default(call_default_factory=True))


class Section(BaseModel):
    """Base of every section: unknown keys are errors, assignments are validated."""

    # allow_inf_nan=False: no setting means anything at NaN or infinity (a learning rate of inf was accepted).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class InputFeature(Section):
    name: str = Field(description="Dataset column that feeds the prompt.")
    type: Literal["text"] = Field("text", description="Input features are text rendered into the prompt.")


class OutputFeature(Section):
    name: str = Field(description="Dataset column holding the target text or label.")
    type: Literal["text", "category"] = Field("text", description="`text` is generated; `category` is a label.")
    decoder: Literal["label_scoring", "classifier"] = Field(
        "label_scoring",
        description="Category only: score each label's tokens as the continuation (`label_scoring`), "
        "or average token probabilities into a trainable linear head (`classifier`).",
    )
    labels: list[str] | None = Field(
        None, description="Category only: the label set; by default the labels found in the training data."
    )
    score_normalization: Literal["sum", "mean"] = Field(
        "sum", description="Category label scoring: the label's log-likelihood (`sum` of its token log-probs) "
        "or their `mean`, which favours multi-token labels whose later tokens are easy to predict."
    )
    calibration: Literal["none", "content_free"] = Field(
        "none", description="Category label scoring: `content_free` divides each label's probability by its "
        "probability when every input is content-free ('N/A', '', '[MASK]') in the same prompt, then renormalises "
        "(contextual calibration, Zhao et al. 2021): it removes the prompt's bias toward some labels."
    )

    @model_validator(mode="after")
    def _labels_are_distinct(self) -> OutputFeature:
        if self.labels is not None:
            if len(self.labels) < 2:
                raise ValueError("a category needs at least two labels")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels must be distinct")
            if any(not label.strip() or label != label.strip() for label in self.labels):
                raise ValueError("labels must be non-empty and without surrounding spaces")
        return self


class PromptConfig(Section):
    template: str | None = Field(
        None, description="Prompt with `{column}` placeholders; by default the input column(s) as they are."
    )
    task: str | None = Field(None, description="Instruction text placed before the rendered template.")
    use_chat_template: bool = Field(
        False, description="Wrap the prompt as a user turn with the tokenizer's chat template."
    )


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
        description="Module names to adapt, or `all-linear`; by default per architecture (the attention q/v "
        "projections; k/v/down projections for ia3).",
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
    type: Literal["finetune", "none"] = Field(
        "finetune", description="`finetune` trains; `none` is zero-shot (nothing is trained or saved)."
    )
    epochs: int = Field(3, ge=1, description="Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Samples per micro-batch.")
    eval_batch_size: int | None = Field(None, ge=1, description="Samples per evaluation batch (default batch_size).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
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
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps spent warming up linearly.")
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
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about 30% more compute."
    )

    @model_validator(mode="after")
    def _schedule_keys(self) -> TrainerConfig:
        if self.warmup_steps is not None and self.warmup_ratio > 0:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        allowed = SCHEDULE_KWARGS[self.lr_scheduler]
        for key in self.lr_scheduler_kwargs:
            if key not in allowed:
                raise ValueError(
                    f"lr_scheduler_kwargs.{key} is not an argument of the {self.lr_scheduler} schedule "
                    f"(it takes: {', '.join(allowed) or 'none'})"
                )
        return self


# Below this, logits / temperature can overflow float32 and sampling meets inf/nan probabilities.
MIN_TEMPERATURE = 0.01


class GenerationSettings(Section):
    """Maps one-to-one onto transformers' GenerationConfig (see generate.py)."""

    max_new_tokens: int = Field(64, ge=1, description="Tokens generated after the prompt.")
    do_sample: bool = Field(False, description="Sample instead of greedy/beam decoding.")
    temperature: float | None = Field(
        None, ge=MIN_TEMPERATURE, description="Sampling temperature (at least 0.01: below it the probabilities "
        "overflow)."
    )
    top_k: int | None = Field(None, ge=1, description="Sample from the k most likely tokens.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    num_beams: int = Field(1, ge=1, description="Beam search width (1: greedy or sampling).")
    repetition_penalty: float | None = Field(None, gt=0, description="Penalty on repeated tokens (>1 discourages).")
    batch_size: int = Field(16, ge=1, description="Prompts generated together.")


class PreprocessingConfig(Section):
    split: tuple[float, float, float] = Field(
        (0.9, 0.1, 0.0), description="Train/validation/test fractions when the data has no split column."
    )
    split_column: str | None = Field(
        None, description="Column with values train / validation / test that assigns each row its split."
    )
    max_input_length: int | None = Field(
        None, ge=1, description="Cap on prompt tokens (never above the model's context rule)."
    )
    max_target_length: int | None = Field(None, ge=1, description="Cap on target tokens during training.")
    overlong_prompts: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="What to do with prompts longer than the maximum input length."
    )

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, split: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(part < 0 for part in split) or abs(sum(split) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be non-negative and add up to 1, got {list(split)}")
        return split


class BackendConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA when available, else CPU.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; `auto` is bfloat16 on CUDA that supports it, else float32."
    )
    max_memory_per_gpu: str | None = Field(None, description="Cap per GPU with device_map=auto, e.g. '20GiB'.")
    trust_remote_code: bool = Field(
        False, description="Allow model code from the Hub for a config you pass yourself (it runs code); a run "
        "folder's saved value is ignored: use --trust-remote-code or TUNEWRIGHT_TRUST_REMOTE_CODE=1."
    )
    allow_pickle_weights: bool = Field(
        False, description="Also load pickle weight files (.bin/.pt) when a model has no safetensors; they can "
        "run code when loaded, so only for sources you trust."
    )
    hub_kernels: bool = Field(
        False, description="Let transformers swap layers for kernels from the Hugging Face Hub (`kernels` package). "
        "Off: no run reaches the network for kernels; on: they are downloaded, or read from the local cache offline."
    )


class MlflowTracking(Section):
    tracking_uri: str | None = Field(
        None, description="Where MLflow records the run; by default a SQLite store in the run folder "
        "(sqlite:///RUN/mlflow/mlflow.db, artifacts in RUN/mlflow/artifacts)."
    )
    experiment: str = Field("tunewright", min_length=1, description="The MLflow experiment (created if missing).")


class ProjectTracking(Section):
    project: str = Field("tunewright", min_length=1, description="The project the run is logged under.")


class TrackingConfig(Section):
    """Experiment trackers, started through Accelerate's trackers (see tracking.py)."""

    tensorboard: bool = Field(False, description="Write TensorBoard event files into RUN/tensorboard/.")
    mlflow: MlflowTracking | None = Field(None, description="Log the run to MLflow (the `tracking` extra).")
    wandb: ProjectTracking | None = Field(None, description="Log the run to Weights & Biases (needs `wandb`).")
    trackio: ProjectTracking | None = Field(None, description="Log the run to Trackio (needs `trackio`).")

    @model_validator(mode="after")
    def _one_project_name(self) -> TrackingConfig:
        # Accelerate starts every tracker under one project name (init_trackers' project_name).
        names = {name for name in (self.mlflow and self.mlflow.experiment, self.wandb and self.wandb.project,
                                   self.trackio and self.trackio.project) if name}
        if len(names) > 1:
            raise ValueError(f"mlflow.experiment, wandb.project and trackio.project must be the same name (got "
                             f"{', '.join(sorted(names))}): the trackers share one project name")
        return self

    @property
    def project(self) -> str:
        """The name every tracker is started under (MLflow experiment, W&B/Trackio project)."""
        named = self.mlflow.experiment if self.mlflow else (self.wandb or self.trackio or ProjectTracking()).project
        return named


class ServeSettings(Section):
    """Settings of `tunewright serve` (CLI options, not part of a model's YAML config)."""

    host: str = Field("127.0.0.1", description="Address to bind; loopback by default.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    max_batch_size: int = Field(16, ge=1, description="Requests generated together in one batch (1: no batching).")
    batch_wait_ms: float = Field(10.0, ge=0, description="How long the first request of a batch waits for others.")
    max_tokens: int = Field(512, ge=1, description="Most new tokens one request may ask for.")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1, description="Largest request body accepted (413 beyond).")
    max_concurrent_requests: int = Field(64, ge=1, description="Requests in flight at once (429 beyond).")
    request_timeout_s: float = Field(300.0, gt=0, description="A request running longer is cancelled (504).")
    api_key: str | None = Field(None, description="When set, every endpoint but /health needs this bearer key.")
    max_predict_rows: int = Field(1000, ge=1, description="Most rows one /predict request may send (400 beyond).")
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host header values accepted ('*' for any). Default: the bound host, plus localhost, "
        "127.0.0.1 and ::1 on a loopback bind; any host on a wildcard bind (0.0.0.0, ::).",
    )
    read_timeout_s: float = Field(
        30.0, gt=0, description="A client must send its request headers, and then its body, within this time (408)."
    )
    send_timeout_s: float = Field(
        30.0, gt=0, description="A client that takes no response data for this long is disconnected."
    )
    max_connections: int = Field(
        256, ge=1, description="Open connections at once, idle keep-alive ones included (503 beyond)."
    )

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, key: str | None) -> str | None:
        if key is not None and not key.strip():
            raise ValueError("the API key is empty; give a non-empty key, or leave it out to serve without one")
        return key


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


class TunewrightConfig(Section):
    base_model: str = Field(
        DEFAULT_BASE_MODEL, description="Local HF folder, Hub id, .gguf file or the alias 'smollm2-135m'."
    )
    input_features: list[InputFeature] = Field(min_length=1, description="Columns that feed the prompt.")
    output_features: list[OutputFeature] = Field(min_length=1, description="The single output column.")
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    adapter: AdapterConfig | None = Field(None, description="peft adapter; absent means full fine-tuning.")
    quantization: QuantizationConfig | None = Field(None, description="Quantized loading (QLoRA).")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    preprocessing: PreprocessingConfig = Field(default_factory=PreprocessingConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Experiment trackers.")
    tune: TuneConfig | None = Field(
        None, description="Hyperparameter search space for `tunewright tune` (ignored by `tunewright train`)."
    )

    @model_validator(mode="after")
    def _check_cross_fields(self) -> TunewrightConfig:
        refuse("TunewrightConfig", [*_structure_problems(self), *_template_problems(self), *_ignored_settings(self),
                                    *_tune_problems(self)])
        return self

    @property
    def output_feature(self) -> OutputFeature:
        return self.output_features[0]

    @property
    def input_columns(self) -> list[str]:
        return [feature.name for feature in self.input_features]

    @property
    def prompt_template(self) -> str:
        return self.prompt.template or default_template(self.input_columns)


def _structure_problems(config: TunewrightConfig) -> list[tuple[Location, str]]:
    problems: list[tuple[Location, str]] = []
    if len(config.output_features) > 1:
        count = len(config.output_features)
        problems.append((("output_features",), f"only a single output feature is supported, got {count}"))
    if config.quantization is not None and (config.adapter is None or config.adapter.type == "full"):
        problems.append((("quantization",), "quantized weights cannot be fully fine-tuned; set adapter.type "
                         "(e.g. lora) or remove the quantization section"))
    if config.quantization is not None and config.backend.device == "cpu":
        problems.append((("quantization",), "4/8-bit loading needs CUDA but backend.device is 'cpu'; remove one"))
    if len(set(config.input_columns)) != len(config.input_columns):
        problems.append((("input_features",), "feature names must be distinct"))
    output_type = config.output_features[0].type
    if output_type not in EVAL_METRICS[config.trainer.eval_metric][1]:
        fitting = [name for name, (_, types) in EVAL_METRICS.items() if output_type in types]
        problems.append((("trainer", "eval_metric"), f"'{config.trainer.eval_metric}' is not reported for "
                         f"{output_type} outputs; choose one of {', '.join(fitting)}"))
    return problems


def tune_metric(config: TunewrightConfig) -> EvalMetric:
    """The metric `tunewright tune` optimises: tune.metric, else trainer.eval_metric."""
    return (config.tune.metric if config.tune else None) or config.trainer.eval_metric


def _tune_problems(config: TunewrightConfig) -> list[tuple[Location, str]]:
    if config.tune is None:
        return []
    problems: list[tuple[Location, str]] = [(("tune", "space", path), problem) for path in config.tune.space
                                            if (problem := tune_path_problem(path)) is not None]
    output_type = config.output_feature.type
    metric = tune_metric(config)
    if output_type not in EVAL_METRICS[metric][1]:
        problems.append((("tune", "metric"), f"'{metric}' is not reported for {output_type} outputs"))
    return problems


def tune_path_problem(path: str) -> str | None:
    """Why a dotted key path does not name one setting of the schema (None: it does)."""
    owner: type[BaseModel] | None = TunewrightConfig
    parts = path.split(".")
    for depth, part in enumerate(parts):
        if owner is None:
            return f"'{'.'.join(parts[:depth])}' is a setting, not a section"
        if part not in owner.model_fields:
            return f"unknown key path{unknown_key_hint(part, owner, TunewrightConfig)}"
        owner = section_class(owner.model_fields[part].annotation)
    if owner is not None:
        return "names a section; search a setting inside it (e.g. trainer.learning_rate)"
    if parts[0] in ("tune", "input_features", "output_features"):
        return f"the {parts[0]} section cannot be searched"
    return None


def _template_problems(config: TunewrightConfig) -> list[tuple[Location, str]]:
    where: Location = ("prompt", "template")
    try:
        fields = template_fields(config.prompt_template)
    except ValueError as error:
        return [(where, str(error))]
    problems: list[tuple[Location, str]] = []
    input_names = config.input_columns
    for name in fields:
        if name not in input_names:
            problems.append((where, f"placeholder {{{name}}} is not an input feature "
                             f"(input features: {', '.join(input_names)})"))
    output = config.output_features[0].name
    if output in fields:
        problems.append((where, f"the output column {{{output}}} must not appear in the prompt"))
    return problems


def _ignored_settings(config: TunewrightConfig) -> list[tuple[Location, str]]:
    """Settings that the rest of the config makes do nothing: refused, so no config looks as if it did more.

    Sampling knobs without do_sample are refused rather than taken to mean sampling: a greedy config
    must not turn random because of a copied `temperature`, and the fix is one explicit line.
    """
    problems: list[tuple[Location, str]] = []

    def check(where: Location, section: BaseModel, keys: tuple[str, ...], applies: bool, fix: str) -> None:
        if not applies:
            problems.extend(((*where, key), fix) for key in keys if changed(section, key))

    generation, trainer, preprocessing = config.generation, config.trainer, config.preprocessing
    check(("generation",), generation, ("temperature", "top_k", "top_p"), generation.do_sample,
          "takes effect only when sampling; set generation.do_sample: true, or remove it")
    for index, output in enumerate(config.output_features):
        check(("output_features", index), output, ("labels", "decoder", "score_normalization"),
              output.type == "category", "applies to type: category only; remove it, or set type: category")
        check(("output_features", index), output, ("calibration",),
              output.type == "category" and output.decoder == "label_scoring",
              "applies to type: category with decoder: label_scoring only; remove it")
        check(("output_features", index), output, ("score_normalization",),
              output.type != "category" or output.decoder == "label_scoring",
              "applies to decoder: label_scoring only (the classifier head does not score labels); remove it")
    check(("trainer",), trainer, ("regularization_lambda",), trainer.regularization is not None,
          "takes effect only with trainer.regularization (l1, l2 or l1_l2); set it, or remove this key")
    check(("trainer",), trainer, ("max_skipped_steps",), trainer.on_nonfinite == "skip_batch",
          "takes effect only with trainer.on_nonfinite: skip_batch; set it, or remove this key")
    check(("trainer",), trainer, ("group_by_length",), not trainer.packing,
          "takes effect only without packing; set trainer.packing: false, or remove this key")
    check(("trainer",), trainer, ("eval_max_rows",), trainer.eval_metric not in TEACHER_FORCED_METRICS,
          "takes effect only with a generated trainer.eval_metric (not loss or token_accuracy); remove it")
    check(("preprocessing",), preprocessing, ("split",), preprocessing.split_column is None,
          "is not used when preprocessing.split_column assigns the splits; remove one of them")
    return problems


def _one_line(text: str) -> str:
    # Keys and values may hold line breaks; the CLI prints one line, so they are shown escaped.
    return text.replace("\r", "\\r").replace("\n", "\\n")


def validate_config(
    raw: Any, source: str = "config", nodes: yaml.Node | None = None, problems: list[str] | None = None
) -> TunewrightConfig:
    """Validate a config dict, reporting every problem at once with its key path.

    Args:
        raw: the parsed YAML (a mapping).
        source: how to name the config in messages (usually its file path).
        nodes: the YAML node tree `raw` came from, to quote values as they were written.
        problems: problems already found in the file (duplicated keys), reported with the rest.

    Raises:
        ConfigError: one line listing every error found.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections, got {type(raw).__name__}")
    found = list(problems or [])
    try:
        config = TunewrightConfig.model_validate(raw)
    except ValidationError as error:
        for item in error.errors():
            message = _one_line(describe(item, TunewrightConfig, raw, nodes))
            if message not in found:  # a list's bad items share one message
                found.append(message)
    if found:
        count = f"{len(found)} errors: " if len(found) > 1 else ""
        raise ConfigError(f"{source}: {count}{'; '.join(found)}")
    return config


def load_config(source: str | Path | dict[str, Any] | TunewrightConfig | Any) -> TunewrightConfig:
    """Read and validate a config from a YAML file, a dict or an existing config object.

    Raises:
        ConfigError: the file is missing, empty or not valid YAML, or the config is invalid.
    """
    if isinstance(source, TunewrightConfig):
        return source
    if not isinstance(source, str | Path):
        return validate_config(source)
    path = Path(source)
    shown = str(path) if str(path).isprintable() else repr(str(path))  # keep the error on one line
    if not path.is_file():
        raise ConfigError(f"{shown}: config file not found; pass the path of a YAML config")
    try:
        document = read_yaml(path)
    except ValueError as error:
        raise ConfigError(f"{shown}: {error}") from None
    return validate_config(document.data, source=shown, nodes=document.root, problems=document.problems)


def config_to_dict(config: TunewrightConfig) -> dict[str, Any]:
    """The fully resolved config (every default filled in), ready to write as YAML."""
    return config.model_dump(mode="json")


def save_config(config: TunewrightConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
