"""The config schema: the whole config, its cross-section checks, loading and saving.

One pydantic class per YAML section, and the only place defaults live: the sections are in
config_data.py (features, prompt, conversations, preprocessing), config_training.py (adapter,
quantization, trainer, preference, tune) and config_runtime.py (generation, backend, tracking, serving),
and every name is importable from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from tunewright.config_data import (
    ConversationConfig,
    FewShotConfig,
    InputFeature,
    OutputFeature,
    PreprocessingConfig,
    PromptConfig,
)
from tunewright.config_messages import describe, section_class, unknown_key_hint
from tunewright.config_runtime import (
    MIN_TEMPERATURE,
    BackendConfig,
    GenerationSettings,
    MlflowTracking,
    ProjectTracking,
    ServeSettings,
    TrackingConfig,
)
from tunewright.config_section import Location, Section, changed, refuse
from tunewright.config_training import (
    ADAPTER_KEYS,
    EVAL_METRICS,
    PREFERENCE_KEYS,
    PREFERENCE_TRAINERS,
    SCHEDULE_KWARGS,
    TEACHER_FORCED_METRICS,
    AdapterConfig,
    AdapterType,
    EvalMetric,
    PreferenceConfig,
    QuantizationConfig,
    TrainerConfig,
    TuneConfig,
    TuneRange,
    TuneValue,
    default_learning_rate,
)
from tunewright.config_yaml import read_yaml
from tunewright.errors import ConfigError
from tunewright.prompt import default_template, template_fields

DEFAULT_BASE_MODEL = "smollm2-135m"





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
    preference: PreferenceConfig = Field(
        default_factory=PreferenceConfig, description="Preference tuning settings (trainer.type dpo/orpo/simpo/kto)."
    )
    conversation: ConversationConfig | None = Field(
        None, description="Train on conversations (chat data) instead of prompt/target columns; input_features "
        "and output_features may then be left out."
    )

    @model_validator(mode="before")
    @classmethod
    def _conversation_features(cls, raw: Any) -> Any:
        # A conversation column is both the input and the target: the features follow from it.
        if isinstance(raw, dict) and isinstance(raw.get("conversation"), dict):
            column = raw["conversation"].get("column", ConversationConfig.model_fields["column"].default)
            raw = {**raw}
            raw.setdefault("input_features", [{"name": column}])
            raw.setdefault("output_features", [{"name": column, "type": "text"}])
        return raw

    @model_validator(mode="after")
    def _check_cross_fields(self) -> TunewrightConfig:
        template_problems = _conversation_problems(self) if self.conversation else _template_problems(self)
        refuse("TunewrightConfig", [*_structure_problems(self), *template_problems, *_ignored_settings(self),
                                    *_tune_problems(self), *_preference_problems(self)])
        if self.trainer.learning_rate is None:  # resolved here, so the saved config records the rate used
            self.trainer = self.trainer.model_copy(update={"learning_rate": default_learning_rate(self.adapter)})
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
    if config.trainer.time_budget is not None and config.adapter is not None and config.adapter.type == "adalora":
        problems.append((("trainer", "time_budget"), "adalora's rank schedule needs the step count before "
                         "training starts; set trainer.max_steps instead, or another adapter.type"))
    output_type = config.output_features[0].type
    if output_type not in EVAL_METRICS[config.trainer.eval_metric][1]:
        fitting = [name for name, (_, types) in EVAL_METRICS.items() if output_type in types]
        problems.append((("trainer", "eval_metric"), f"'{config.trainer.eval_metric}' is not reported for "
                         f"{output_type} outputs; choose one of {', '.join(fitting)}"))
    return problems


def _preference_problems(config: TunewrightConfig) -> list[tuple[Location, str]]:
    """Preference keys the trainer would ignore, and what a preference trainer needs."""
    trainer, preference = config.trainer.type, config.preference
    if trainer not in PREFERENCE_TRAINERS:
        return [(("preference", key), "applies to trainer.type dpo, orpo, simpo or kto only; remove it")
                for key in PreferenceConfig.model_fields if changed(preference, key)]
    problems: list[tuple[Location, str]] = [
        (("preference", key), f"does not apply to trainer.type {trainer} (only to {', '.join(users)}); remove it")
        for key, users in PREFERENCE_KEYS.items() if trainer not in users and changed(preference, key)]
    full = config.adapter is None or config.adapter.type == "full"
    if trainer in ("dpo", "kto") and full and preference.reference is None:
        problems.append((("preference", "reference"), f"{trainer} with full fine-tuning needs a reference model; "
                         "set preference.reference to an earlier run folder, or train an adapter (e.g. lora)"))
    if config.output_feature.type != "text":
        problems.append((("output_features", 0, "type"), f"{trainer} trains on text responses; set type: text"))
    if config.trainer.eval_metric != "loss":
        problems.append((("trainer", "eval_metric"), f"{trainer} keeps the weights of the lowest validation loss; "
                         "set eval_metric: loss"))
    if config.adapter is not None and config.adapter.is_prompt_learning:
        problems.append((("adapter", "type"), f"{trainer} needs weights to tune, not virtual tokens; use lora "
                         "(or another weight adapter)"))
    if config.conversation is not None:
        problems.append((("conversation",), f"{trainer} reads prompt/chosen/rejected columns (or hh-rlhf "
                         "transcripts: preference.format hh_rlhf); remove the conversation section"))
    if config.prompt.few_shot is not None:
        problems.append((("prompt", "few_shot"), f"{trainer} compares responses to one prompt; few-shot examples "
                         "apply to supervised and zero-shot runs; remove it"))
    if preference.format == "hh_rlhf" and len(config.input_features) != 1:
        problems.append((("input_features",), "format hh_rlhf fills one input feature (the shared prompt); "
                         "list exactly one"))
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


def _conversation_problems(config: TunewrightConfig) -> list[tuple[Location, str]]:
    """Conversation data: the features are the conversation column, and prompt rendering settings do not apply."""
    assert config.conversation is not None
    column = config.conversation.column
    problems: list[tuple[Location, str]] = []
    if config.input_columns != [column] or config.output_feature.name != column:
        problems.append((("conversation", "column"), f"with conversation data the features are the column "
                         f"'{column}'; remove input_features and output_features"))
    if config.output_feature.type != "text":
        problems.append((("output_features", 0, "type"), "conversation targets are text; remove it"))
    for key in ("template", "task", "use_chat_template", "few_shot"):
        if changed(config.prompt, key):
            problems.append((("prompt", key), "does not apply to conversation data (the chat template renders "
                             "it); remove it, or use prompt.system_prompt / prompt.chat_template"))
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
    if config.conversation is not None:
        check(("conversation",), config.conversation, ("speakers",), config.conversation.format in ("auto",
              "transcript"), "applies to format: transcript only; remove it, or set conversation.format: transcript")
    check(("prompt",), config.prompt, ("chat_template", "system_prompt"),
          config.conversation is not None or config.prompt.use_chat_template,
          "applies to conversation data or prompt.use_chat_template: true; set one, or remove this key")
    check(("prompt",), config.prompt, ("reasoning",), config.conversation is not None,
          "applies to conversation data only; remove it, or add a conversation section")
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


# The sections are defined in config_data.py, config_training.py and config_runtime.py and imported from here.
__all__ = [
    "ADAPTER_KEYS",
    "AdapterConfig",
    "AdapterType",
    "BackendConfig",
    "ConversationConfig",
    "FewShotConfig",
    "DEFAULT_BASE_MODEL",
    "EVAL_METRICS",
    "EvalMetric",
    "GenerationSettings",
    "InputFeature",
    "Location",
    "MIN_TEMPERATURE",
    "MlflowTracking",
    "OutputFeature",
    "PREFERENCE_KEYS",
    "PREFERENCE_TRAINERS",
    "PreferenceConfig",
    "PreprocessingConfig",
    "ProjectTracking",
    "PromptConfig",
    "QuantizationConfig",
    "SCHEDULE_KWARGS",
    "Section",
    "ServeSettings",
    "TEACHER_FORCED_METRICS",
    "TrackingConfig",
    "TrainerConfig",
    "TuneConfig",
    "TuneRange",
    "TuneValue",
    "TunewrightConfig",
    "changed",
    "config_to_dict",
    "load_config",
    "refuse",
    "save_config",
    "tune_metric",
    "tune_path_problem",
    "validate_config",
]
