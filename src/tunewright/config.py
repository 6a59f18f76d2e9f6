"""The config schema: one pydantic class per YAML section, and the only place defaults live."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunewright.errors import ConfigError
from tunewright.prompt import default_template, template_fields

DEFAULT_BASE_MODEL = "smollm2-135m"


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
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("linear", description="Decay after warmup.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps spent warming up linearly.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm (null: no clipping).")
    regularization: Literal["l1", "l2", "l1_l2"] | None = Field(
        None, description="Extra penalty on trainable weights added to the loss."
    )
    regularization_lambda: float = Field(0.01, ge=0, description="Weight of the regularization penalty.")
    eval_every: int | None = Field(
        None, ge=1, description="Evaluate the validation loss every N optimizer steps (default: each epoch)."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a better validation loss."
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


class GenerationSettings(Section):
    """Maps one-to-one onto transformers' GenerationConfig (see generate.py)."""

    max_new_tokens: int = Field(64, ge=1, description="Tokens generated after the prompt.")
    do_sample: bool = Field(False, description="Sample instead of greedy/beam decoding.")
    temperature: float | None = Field(None, gt=0, description="Sampling temperature.")
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

    @model_validator(mode="after")
    def _check_cross_fields(self) -> TunewrightConfig:
        if len(self.output_features) > 1:
            raise ValueError(
                f"output_features: only a single output feature is supported, got {len(self.output_features)}"
            )
        if self.quantization is not None and (self.adapter is None or self.adapter.type == "full"):
            raise ValueError(
                "quantization: quantized weights cannot be fully fine-tuned; set adapter.type (e.g. lora) "
                "or remove the quantization section"
            )
        if self.quantization is not None and self.backend.device == "cpu":
            raise ValueError("quantization: 4/8-bit loading needs CUDA but backend.device is 'cpu'; remove one")
        input_names = [feature.name for feature in self.input_features]
        if len(set(input_names)) != len(input_names):
            raise ValueError("input_features: feature names must be distinct")
        template = self.prompt.template or default_template(input_names)
        try:
            fields = template_fields(template)
        except ValueError as error:
            raise ValueError(f"prompt.template: {error}") from None
        missing = [name for name in fields if name not in input_names]
        if missing:
            raise ValueError(
                f"prompt.template: placeholder {{{missing[0]}}} is not an input feature "
                f"(input features: {', '.join(input_names)})"
            )
        output = self.output_features[0]
        if output.name in fields:
            raise ValueError(f"prompt.template: the output column {{{output.name}}} must not appear in the prompt")
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


def _key_path(location: tuple[int | str, ...]) -> str:
    """('input_features', 0, 'nme') -> 'input_features[0].nme'."""
    path = ""
    for item in location:
        path += f"[{item}]" if isinstance(item, int) else (f".{item}" if path else str(item))
    return path or "(top level)"


def _section_for(location: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The schema class that owns the key at `location`, to suggest names from."""
    model: Any = TunewrightConfig
    for item in location[:-1]:
        if isinstance(item, int):
            continue
        field = model.model_fields.get(item)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for candidate in candidates:
            inner = getattr(candidate, "__args__", (candidate,))
            classes = [c for c in (candidate, *inner) if isinstance(c, type) and issubclass(c, BaseModel)]
            if classes:
                model = classes[0]
                break
        else:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(error: Any) -> str:
    location = tuple(part for part in error["loc"] if not str(part).startswith("function-after"))
    path = _key_path(location)
    if error["type"] == "extra_forbidden":
        owner = _section_for(location)
        hint = ""
        if owner is not None:
            close = difflib.get_close_matches(str(location[-1]), list(owner.model_fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(owner.model_fields)})"
        return f"{path}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "value_error" and ":" in message and path == "(top level)":
        return message
    return f"{path}: {message}"


def validate_config(raw: Any, source: str = "config") -> TunewrightConfig:
    """Validate a config dict, reporting every problem at once with its key path.

    Args:
        raw: the parsed YAML (a mapping).
        source: how to name the config in messages (usually its file path).

    Raises:
        ConfigError: one line listing every error found.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections, got {type(raw).__name__}")
    try:
        return TunewrightConfig.model_validate(raw)
    except ValidationError as error:
        # Keys and values may hold line breaks; the CLI prints one line, so they are shown escaped.
        problems = [_describe(item).replace("\r", "\\r").replace("\n", "\\n") for item in error.errors()]
        count = f"{len(problems)} errors: " if len(problems) > 1 else ""
        raise ConfigError(f"{source}: {count}{'; '.join(problems)}") from None


def load_config(source: str | Path | dict[str, Any] | TunewrightConfig | Any) -> TunewrightConfig:
    """Read and validate a config from a YAML file, a dict or an existing config object.

    Raises:
        ConfigError: the file is missing or unreadable, or the config is invalid.
    """
    if isinstance(source, TunewrightConfig):
        return source
    if not isinstance(source, str | Path):
        return validate_config(source)
    path = Path(source)
    if not path.is_file():
        shown = str(path) if str(path).isprintable() else repr(str(path))  # keep the error on one line
        raise ConfigError(f"{shown}: config file not found; pass the path of a YAML config")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{path}: not valid YAML ({first_line})") from None
    return validate_config(raw, source=str(path))


def config_to_dict(config: TunewrightConfig) -> dict[str, Any]:
    """The fully resolved config (every default filled in), ready to write as YAML."""
    return config.model_dump(mode="json")


def save_config(config: TunewrightConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
