"""Export a run for use without tunewright: a plain Hugging Face model folder, or the adapter alone.

A merged export loads with `AutoModelForCausalLM.from_pretrained(folder)`; an adapter export
loads with `PeftModel.from_pretrained(base_model, folder)`. Both carry the tokenizer (with its
chat template) and a generation config holding the run's generation settings, so plain
`model.generate(**tokenizer(prompt, return_tensors="pt"))` decodes as tunewright does.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tunewright.config import TunewrightConfig, save_config
from tunewright.errors import ConfigError, RunFolderError
from tunewright.generate import to_generation_config
from tunewright.loading import load
from tunewright.output_folder import check_outside_sources, check_replaceable, entry_names, remove_entries
from tunewright.predictor import TunedModel
from tunewright.run import check_complete, load_run_config

log = logging.getLogger(__name__)

ExportDtype = Literal["float32", "bfloat16", "float16"]
# The resolved tunewright config travels with the export (prompt template, generation settings);
# transformers and peft ignore the file.
EXPORT_CONFIG_FILE = "tunewright_config.yaml"


def is_adapter_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def merged_model(tuned: TunedModel) -> nn.Module:
    """The plain transformers model: the adapter merged into the weights (or the full weights).

    Raises:
        ConfigError: prompt/prefix tuning, whose virtual tokens are not weights and cannot be merged.
    """
    model: Any = tuned.model
    if not is_adapter_model(model):
        return tuned.model
    check_exportable(tuned.config, merge=True)
    # merge_and_unload folds each adapter's update into its base layer and returns the base model.
    merged: nn.Module = model.merge_and_unload()
    return merged


def check_exportable(config: TunewrightConfig, merge: bool) -> None:
    """Refuse, before any model is loaded, what an export cannot represent.

    Raises:
        ConfigError: merging virtual tokens or quantized weights; a classifier head.
    """
    output = config.output_feature
    if output.type == "category" and output.decoder == "classifier":
        raise ConfigError(
            "export: output_features[0].decoder 'classifier' adds a head that a plain causal LM cannot hold; "
            "use decoder 'label_scoring' to export, or serve the run folder with tunewright"
        )
    if merge and config.adapter is not None and config.adapter.is_prompt_learning:
        raise ConfigError(
            f"export --merge: adapter.type {config.adapter.type} learns virtual tokens, which cannot be "
            "merged into the model's weights; export without --merge to get the adapter folder"
        )
    if merge and config.quantization is not None:
        raise ConfigError(
            "export --merge: the run's base model is quantized, and merging into quantized weights loses the "
            "adapter's precision; export without --merge (the adapter alone)"
        )


def check_output_dir(output_dir: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse an output that is, holds or lies inside the run being exported, and (without `overwrite`)
    an existing non-empty folder; `overwrite` replaces only an export folder holding nothing else.

    Raises:
        RunFolderError: naming the folder and, for --overwrite, what it would delete.
    """
    check_output_dir_kind(output_dir, overwrite, "export folder", EXPORT_CONFIG_FILE, source)


def check_output_dir_kind(output_dir: Path, overwrite: bool, kind: str, marker: str,
                          source: Path | None = None) -> None:
    """`check_output_dir` for an export `kind` recognised by its `marker` file (a name or glob)."""
    if source is not None:
        check_outside_sources(output_dir, [("the run being exported", source)])
    if not output_dir.exists() or (output_dir.is_dir() and not entry_names(output_dir)):
        return
    if not overwrite and output_dir.is_dir():
        raise RunFolderError(f"{output_dir}: the {kind} exists and is not empty; pass --overwrite")
    check_replaceable(output_dir, kind, marker)


def staging_dir(output_dir: Path) -> Path:
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.exporting-", dir=output_dir.parent))


def replace_output(staging: Path, output_dir: Path) -> None:
    """Move the finished export into place; an old export there (checked replaceable) is removed first."""
    if output_dir.is_dir():
        remove_entries(output_dir)
        output_dir.rmdir()
    staging.rename(output_dir)


def export_model(
    tuned: TunedModel,
    output_dir: str | Path,
    merge: bool = False,
    dtype: ExportDtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `tuned` as a plain Hugging Face folder (merged or full weights) or as its adapter alone.

    Runs without an adapter (full fine-tuning, or trainer.type none) always export full weights.
    The folder is written under a temporary name and renamed when complete.

    Args:
        tuned: a loaded run (`tunewright.load`). Merging modifies it: load it again to keep using it.
        output_dir: the folder to write.
        merge: merge the adapter into the base weights (else write the adapter folder alone).
        dtype: cast the weights to this dtype (default: keep the run's dtype).
        overwrite: replace an existing export folder (one that holds only what an export writes).

    Raises:
        ConfigError: the run cannot be exported as asked (prompt-learning merge, classifier head).
        RunFolderError: the output folder exists and `overwrite` is false, or it is not an export folder,
            or it holds files an export does not write (they are listed; nothing is deleted).
    """
    output_dir = Path(output_dir)
    target = output_dir.resolve()  # a symlinked output folder is replaced where it points
    check_exportable(tuned.config, merge)
    check_output_dir(output_dir, overwrite)
    staging = staging_dir(target)
    try:
        model: Any = merged_model(tuned) if merge or not is_adapter_model(tuned.model) else tuned.model
        if dtype is not None:
            model.to(getattr(torch, dtype))
        generation_config = to_generation_config(tuned.config.generation, tuned.tokenizer)
        if is_adapter_model(model):
            model.save_pretrained(staging, safe_serialization=True)  # adapter_config.json + weights
            generation_config.save_pretrained(staging)
        else:
            model.generation_config = generation_config
            model.config.pad_token_id = tuned.tokenizer.pad_token_id
            model.save_pretrained(staging, safe_serialization=True)
        # Generation pads on the left; transformers writes padding_side only from the init kwargs.
        tuned.tokenizer.init_kwargs["padding_side"] = "left"
        tuned.tokenizer.save_pretrained(staging)  # tokenizer files and chat_template.jinja
        save_config(tuned.config, staging / EXPORT_CONFIG_FILE)
        check_output_dir(output_dir, overwrite)  # again: the folder may have changed while the model was saved
        replace_output(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    kind = "adapter" if is_adapter_model(model) else "model"
    log.debug("exported the %s to %s", kind, output_dir)
    return output_dir


def export_run(
    run_dir: str | Path,
    output_dir: str | Path,
    merge: bool = False,
    dtype: ExportDtype | None = None,
    overwrite: bool = False,
    trust_remote_code: bool | None = None,
) -> Path:
    """Load a complete run folder and export it (see `export_model`); checks come before loading.

    Remote code runs only with `trust_remote_code` (None: TUNEWRIGHT_TRUST_REMOTE_CODE), never because
    the run's saved config asks for it.
    """
    run_dir = check_complete(run_dir)
    check_exportable(load_run_config(run_dir), merge)
    check_output_dir(Path(output_dir), overwrite, run_dir)
    return export_model(load(run_dir, trust_remote_code), output_dir, merge, dtype, overwrite)
