"""The models a server holds: runs and zero-shot configs, sharing one copy of each base model.

Adapter runs whose configs name the same base model (and backend and quantization) are attached
to a single peft model under distinct adapter names, and the base model itself is served too,
with the adapters disabled. Only the batcher's worker thread activates a model (see
`ServedModel.active`), so adapter switches happen between batches, never inside one.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tunewright import loading
from tunewright.chat_templates import set_run_template
from tunewright.config import GenerationSettings, TunewrightConfig, load_config
from tunewright.errors import ConfigError, TunewrightError
from tunewright.heads import load_vocabulary
from tunewright.model import LoadedModel, base_model, context_length, load_base_model, load_tokenizer
from tunewright.predictor import TunedModel, attach_category
from tunewright.run import check_complete, load_run_config, weights_kind
from tunewright.trust import remote_code_trusted, with_trust

log = logging.getLogger(__name__)

# Adapter types peft can hold several of on one model and switch between with set_adapter.
# Prompt learning and AdaLoRA runs are loaded on their own copy of the base instead.
SHAREABLE_ADAPTERS = frozenset({"lora", "ia3", "loha", "lokr"})


@dataclass
class ServedModel:
    """One name a request's `model` field can pick.

    Attributes:
        name: the id clients send.
        tuned: model, tokenizer and config (the config drives /predict and generation defaults).
        adapter: peft adapter to activate; None serves `tuned.model` as it is, or with its
            adapters disabled when it is a peft model (the base of a group).
        parent: for adapters, the base model they were trained on.
        predictable: has a config of its own (a run or a zero-shot config), so /predict works.
        defaults: generation settings used where a request leaves a field out.
        request_tokenizer: a private copy used only by the server's tokenizer thread, so that
            thread and the worker never share one Rust tokenizer object.
    """

    name: str
    tuned: TunedModel
    adapter: str | None = None
    parent: str | None = None
    predictable: bool = True
    defaults: GenerationSettings = field(default_factory=GenerationSettings)
    request_tokenizer: PreTrainedTokenizerBase = field(init=False)
    context_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.request_tokenizer = copy.deepcopy(self.tuned.tokenizer)
        self.context_len = context_length(cast(PreTrainedModel, base_model(self.tuned.model)))

    @contextmanager
    def active(self) -> Iterator[Any]:
        """The model with this entry's adapter switched on (call from the worker thread only)."""
        model = self.tuned.model
        if isinstance(model, PeftModel):
            if self.adapter is None:
                with model.disable_adapter():
                    yield model
                return
            model.set_adapter(self.adapter)
        yield model


@dataclass
class SharedBase:
    """One loaded base model and the adapters attached to it."""

    name: str
    loaded: LoadedModel
    peft: PeftModel | None = None
    adapter_type: str | None = None
    adapters: int = 0

    @property
    def model(self) -> nn.Module:
        return self.peft if self.peft is not None else self.loaded.model

    def accepts(self, adapter_type: str) -> bool:
        """peft holds several adapters on one model only when they are of one type."""
        return adapter_type in SHAREABLE_ADAPTERS and self.adapter_type in (None, adapter_type)

    def attach(self, run_dir: Path, adapter_type: str) -> str:
        """Load a run's adapter onto the shared model; returns its peft adapter name."""
        self.adapter_type = adapter_type
        # peft keeps adapters in ModuleDicts, so names must not contain dots; ours are a0, a1, ...
        adapter_name = f"a{self.adapters}"
        self.adapters += 1
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.loaded.model, str(run_dir), adapter_name=adapter_name)
        else:
            self.peft.load_adapter(str(run_dir), adapter_name=adapter_name)
        self.peft.eval()
        return adapter_name


def _parse_spec(spec: str) -> tuple[str | None, Path]:
    """'NAME=PATH' or 'PATH' -> (NAME or None, PATH)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name:
        return name, Path(path)
    return None, Path(spec)


def _shareable(run_dir: Path) -> bool:
    """A run whose adapter can join others on one shared base model."""
    config = load_run_config(run_dir)
    return (
        weights_kind(run_dir) == "adapter"
        and config.adapter is not None
        and (config.adapter.type in SHAREABLE_ADAPTERS)
    )


def public_name(base_model: str) -> str:
    """The name a base model is served under: a local folder or file by its own name, never its path.

    /v1/models is open to every client, and a path would tell them about the server's disk.
    """
    path = Path(base_model).expanduser()
    if path.is_absolute() or path.exists() or base_model.startswith((".", "~")):
        return path.name
    return base_model  # a Hub id or an alias


def _group_key(config: TunewrightConfig) -> str:
    parts = [config.base_model, config.backend.model_dump_json()]
    parts.append(config.quantization.model_dump_json() if config.quantization else "")
    return "|".join(parts)


class _PoolBuilder:
    def __init__(self, trust_remote_code: bool = False) -> None:
        self.models: dict[str, ServedModel] = {}
        self.bases: dict[str, SharedBase] = {}
        self.trust_remote_code = trust_remote_code  # the person's choice; run folders never decide it

    def add(self, served: ServedModel, source: str) -> None:
        if served.name in self.models:
            raise TunewrightError(
                f"{source}: the model name '{served.name}' is already taken; name it with NAME={source}"
            )
        self.models[served.name] = served

    def base_for(self, config: TunewrightConfig) -> SharedBase:
        key = _group_key(config)
        if key not in self.bases:
            log.info("loading base model %s", config.base_model)
            loaded = load_base_model(config.base_model, config.backend, config.quantization)
            loaded.model.eval()
            self.bases[key] = SharedBase(public_name(config.base_model), loaded)
        return self.bases[key]

    def add_run(self, name: str | None, run_dir: Path) -> None:
        config = load_run_config(run_dir, self.trust_remote_code)
        name = name or run_dir.resolve().name
        kind = weights_kind(run_dir)
        adapter_type = config.adapter.type if config.adapter else "full"
        shared = self.base_for(config) if kind == "none" or _shareable(run_dir) else None
        if shared is None or (kind == "adapter" and not shared.accepts(adapter_type)):
            # Full weights, prompt learning, AdaLoRA, or a second adapter type: its own copy.
            tuned = loading.load(run_dir, self.trust_remote_code)
            adapter_name = "default" if isinstance(tuned.model, PeftModel) else None
            parent = public_name(config.base_model) if adapter_name else None
            self.add(ServedModel(name, tuned, adapter_name, parent, defaults=config.generation), str(run_dir))
            return
        adapter_name = shared.attach(run_dir, adapter_type) if kind == "adapter" else None
        tokenizer = load_tokenizer(str(run_dir), config.backend.trust_remote_code)
        tuned = TunedModel(shared.model, tokenizer, config, few_shot=loading.run_few_shot(config, run_dir))
        if (
            config.output_feature.type == "category"
        ):  # labels (and the classifier head) as loading.load gives them
            attach_category(tuned, load_vocabulary(run_dir), run_dir)
            if tuned.classifier is not None:
                tuned.classifier.eval()
        parent = public_name(config.base_model) if adapter_name else None
        self.add(ServedModel(name, tuned, adapter_name, parent, defaults=config.generation), str(run_dir))

    def add_config(self, name: str | None, path: Path) -> None:
        config = load_config(path)  # the person's own config: its trust_remote_code counts, and the flag adds to it
        if self.trust_remote_code and not config.backend.trust_remote_code:
            config = config.model_copy(update={"backend": with_trust(config.backend, True)})
        name = name or path.stem
        if config.prompt.few_shot is not None:
            raise ConfigError(f"{path}: prompt.few_shot needs the training rows as its pool; train the config "
                              "(trainer.type none for zero-shot) and serve the run folder")
        if config.output_feature.type == "category":  # from_config checks and attaches the labels
            tuned = loading.from_config(config)
        else:
            tokenizer = copy.deepcopy(self.base_for(config).loaded.tokenizer)  # the config's chat template is its own
            set_run_template(config, tokenizer)
            tuned = TunedModel(self.base_for(config).model, tokenizer, config)
        self.add(ServedModel(name, tuned, None, None, defaults=config.generation), str(path))

    def add_bases(self) -> None:
        """Each base model that carries adapters is served under its own name, adapters off."""
        for shared in self.bases.values():
            if shared.peft is None or shared.name in self.models:
                continue
            owner = next(m for m in self.models.values() if m.tuned.model is shared.peft)
            tuned = TunedModel(shared.peft, shared.loaded.tokenizer, owner.tuned.config)
            self.models[shared.name] = ServedModel(shared.name, tuned, None, None, predictable=False)


def load_models(
    runs: Sequence[str | Path] = (), configs: Sequence[str | Path] = (), trust_remote_code: bool | None = None
) -> dict[str, ServedModel]:
    """Load run folders and zero-shot configs for serving, sharing base weights where possible.

    Args:
        runs: run folders, each `PATH` (named after the folder) or `NAME=PATH`.
        configs: zero-shot configs, each `PATH` (named after the file stem) or `NAME=PATH`.
        trust_remote_code: let model code run (None: TUNEWRIGHT_TRUST_REMOTE_CODE); a run folder's
            saved backend.trust_remote_code is ignored.

    Returns:
        The served models by name: every run, every config, and the base model of each group of
        adapters (named by its `base_model` value; a local folder by its own name, never its path).

    Raises:
        TunewrightError: nothing to serve, a name used twice, or a run/config that cannot be loaded.
    """
    if not runs and not configs:
        raise TunewrightError("nothing to serve: pass --model RUN_FOLDER (repeatable) or --config CONFIG")
    builder = _PoolBuilder(remote_code_trusted(trust_remote_code))
    parsed = [(name, check_complete(path)) for name, path in map(_parse_spec, map(str, runs))]
    # Adapters go first: attaching one wraps the shared base in place, so whatever serves the
    # base (adapters disabled) must be set up once the peft model is final.
    for name, run_dir in sorted(parsed, key=lambda item: not _shareable(item[1])):
        builder.add_run(name, run_dir)
    for spec in configs:
        builder.add_config(*_parse_spec(str(spec)))
    builder.add_bases()
    return builder.models
