"""TunedModel from a run folder or straight from a config: what `tunewright.load` returns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunewright.adapters import load_adapter
from tunewright.chat_templates import set_run_template
from tunewright.config import TunewrightConfig, load_config
from tunewright.data import Dataset, as_frame, check_columns, drop_missing_targets, few_shot_pool
from tunewright.errors import ConfigError
from tunewright.few_shot import FewShotIndex, load_index
from tunewright.heads import ROWS_NEED_TRAINING, load_vocabulary
from tunewright.model import load_base_model, load_tokenizer, require_quantization_support
from tunewright.predictor import TunedModel, attach_category
from tunewright.run import check_complete, load_run_config, weights_kind
from tunewright.trust import remote_code_trusted, with_trust


def from_config(
    config: str | Path | dict[str, Any] | TunewrightConfig, trust_remote_code: bool | None = None,
    few_shot_pool: Dataset | None = None,
) -> TunedModel:
    """A zero-shot model straight from a config (no run folder): the base model as configured.

    The config is the caller's own, so its backend.trust_remote_code counts; `trust_remote_code`
    (else TUNEWRIGHT_TRUST_REMOTE_CODE) can turn trust on as well, never off.

    With `prompt.few_shot`, `few_shot_pool` gives the solved examples (the rows of a training split).
    """
    config = load_config(config)
    pool = _few_shot_pool(config, few_shot_pool)
    if config.output_feature.type == "category" and config.output_feature.calibration == "rows":
        raise ConfigError(ROWS_NEED_TRAINING)
    if remote_code_trusted(trust_remote_code) and not config.backend.trust_remote_code:
        config = config.model_copy(update={"backend": with_trust(config.backend, True)})
    require_quantization_support(config.quantization, config.backend)
    loaded = load_base_model(config.base_model, config.backend, config.quantization)
    set_run_template(config, loaded.tokenizer)
    loaded.model.eval()
    tuned = TunedModel(loaded.model, loaded.tokenizer, config, few_shot=pool)
    if config.output_feature.type == "category":
        if config.output_feature.labels is None:
            raise ConfigError(
                "output_features[0].labels: a category model used straight from its config needs its labels "
                "listed there (or train with trainer.type none to take them from the data)"
            )
        attach_category(tuned, config.output_feature.labels)
    return tuned


def load(run_dir: str | Path, trust_remote_code: bool | None = None) -> TunedModel:
    """Load a complete run folder: base model + saved adapter, or the saved full weights.

    Remote code runs only with `trust_remote_code=True` (or, when it is None,
    TUNEWRIGHT_TRUST_REMOTE_CODE=1); the run's saved backend.trust_remote_code is ignored.
    """
    run_dir = check_complete(run_dir)
    config = load_run_config(run_dir, trust_remote_code)
    kind = weights_kind(run_dir)
    if kind == "full":
        loaded = load_base_model(str(run_dir), config.backend)
    else:
        loaded = load_base_model(config.base_model, config.backend, config.quantization)
        loaded.tokenizer = load_tokenizer(str(run_dir), config.backend.trust_remote_code)
    model = load_adapter(loaded.model, str(run_dir)) if kind == "adapter" else loaded.model
    model.eval()
    tuned = TunedModel(model, loaded.tokenizer, config, few_shot=run_few_shot(config, run_dir))
    if config.output_feature.type == "category":
        attach_category(tuned, load_vocabulary(run_dir), run_dir)
        if tuned.classifier is not None:
            tuned.classifier.eval()
    return tuned


def _few_shot_pool(config: TunewrightConfig, rows: Dataset | None) -> FewShotIndex | None:
    if rows is None:
        if config.prompt.few_shot is not None:
            raise ConfigError("prompt.few_shot: pass the training rows as few_shot_pool, or train a run "
                              "(trainer.type none keeps the training split as the pool)")
        return None
    if config.prompt.few_shot is None:
        raise ConfigError("few_shot_pool: the config has no prompt.few_shot section; add one, or drop the pool")
    frame, source = as_frame(rows)
    target = config.output_feature.name
    check_columns(frame, [*config.input_columns, target], source)
    return few_shot_pool(drop_missing_targets(frame, target, source), config)


def run_few_shot(config: TunewrightConfig, run_dir: Path) -> FewShotIndex | None:
    """The few-shot pool saved with a run (None when its config has no prompt.few_shot)."""
    settings = config.prompt.few_shot
    return load_index(settings, config.trainer.seed, run_dir) if settings is not None else None
