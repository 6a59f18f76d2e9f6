"""Export a run as one GGUF file for llama.cpp, or a GGUF file and a Modelfile for Ollama.

The run's weights are merged and written as a Hugging Face folder in a scratch folder, with the
run's prompt rendering as its chat template (exported_prompt.py); llama.cpp's own converter
(gguf_converter.py) turns that folder into the GGUF file, tokenizer, special tokens and chat
template included. The output folder appears complete or not at all.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from tunewright.config import GenerationSettings, TunewrightConfig
from tunewright.errors import ConfigError
from tunewright.export import (
    check_exportable,
    check_output_dir_kind,
    export_model,
    replace_output,
    staging_dir,
)
from tunewright.exported_prompt import (
    message_column,
    modelfile_text,
    ollama_parameters,
    ollama_template,
    run_chat_template,
)
from tunewright.gguf_converter import convert, ensure_converter
from tunewright.loading import load
from tunewright.ollama_templates import conversation_ollama_template
from tunewright.predictor import TunedModel
from tunewright.run import check_complete, load_run_config

log = logging.getLogger(__name__)

Quantization = Literal["f32", "f16", "bf16", "q8_0"]
ExportFormat = Literal["hf", "gguf", "ollama"]
GGUF_MARKER = "*.gguf"


def usage_notes(config: TunewrightConfig, labels: list[str] | None = None) -> list[str]:
    """What a person running the file must know: what the chat message stands for, how labels are scored."""
    column = message_column(config)
    if config.conversation is not None:
        name = config.prompt.chat_template or "the tokenizer's own"
        return [f"Send the whole conversation as messages: the chat template ({name}) renders it as the run "
                "trained on it."]
    if column is not None:
        notes = [f"Send the value of the input column '{column}' as the user message; the chat template "
                 "renders the prompt the run trained on."]
    else:
        notes = ["Send the whole prompt, written as the run's prompt.template renders it, as the user message."]
    output = config.output_feature
    if output.type == "category":
        notes.append(
            f"The run scores labels ({', '.join(labels or [])}): tunewright picks the label whose tokens "
            "are most likely after the prompt. This file generates text; greedy text is the most likely "
            "label only when the labels' first tokens differ."
        )
    return notes


def sampling_metadata(settings: GenerationSettings) -> dict[str, Any]:
    """The run's generation settings as GGUF `general.sampling.*` defaults (llama.cpp reads them)."""
    values: dict[str, Any]
    if settings.do_sample:
        values = {"general.sampling.temp": settings.temperature, "general.sampling.top_k": settings.top_k,
                  "general.sampling.top_p": settings.top_p}
    else:
        values = {"general.sampling.temp": 0.0}
    if settings.repetition_penalty is not None:
        values["general.sampling.penalty_repeat"] = settings.repetition_penalty
    return {key: value for key, value in values.items() if value is not None}


def _stage_merged_folder(tuned: TunedModel, scratch: Path) -> Path:
    """The merged model as a Hugging Face folder whose chat template is the run's prompt rendering."""
    tuned.tokenizer.chat_template = run_chat_template(tuned.config, tuned.tokenizer)
    folder = scratch / "merged"
    export_model(tuned, folder, merge=True, dtype="float32")
    return folder


def _write_metadata(folder: Path, name: str, tuned: TunedModel) -> Path:
    notes = usage_notes(tuned.config, tuned.labels)
    metadata = {"general.name": name, "general.description": " ".join(notes),
                **sampling_metadata(tuned.config.generation)}
    path = folder / "metadata.json"
    path.write_text(json.dumps(metadata))
    return path


def export_gguf(
    tuned: TunedModel,
    output_dir: str | Path,
    quantization: Quantization = "f16",
    ollama: bool = False,
    overwrite: bool = False,
    name: str | None = None,
) -> Path:
    """Write the run as `<name>-<quantization>.gguf` in `output_dir` (and a Modelfile with `ollama`).

    Args:
        tuned: a loaded run. The adapter is merged into its weights: load it again to keep using it.
        output_dir: the folder to write; it holds only the GGUF file (and the Modelfile).
        quantization: the GGUF tensor type: f32, f16, bf16 or q8_0.
        ollama: also write an Ollama Modelfile pointing at the file.
        overwrite: replace an earlier GGUF export in that folder.
        name: the model's name in the file and its file name (default: the output folder's name).

    Raises:
        ConfigError: a classifier head, virtual tokens, or a quantized base model (nothing to merge into).
        RunFolderError: the output folder is not empty (without `overwrite`) or holds foreign files.
        ExportError: llama.cpp's converter could not be fetched, or it refused the model.
    """
    output_dir = Path(output_dir)
    target = output_dir.resolve()
    check_exportable(tuned.config, merge=True)
    conversation_template = None
    if ollama and tuned.config.conversation is not None:  # refused before the slow part when it has no Go twin
        conversation_template, _ = conversation_ollama_template(tuned.config, tuned.tokenizer)
    check_output_dir_kind(output_dir, overwrite, "GGUF export folder", GGUF_MARKER)
    ensure_converter()  # fetched before the slow part, so a failure costs nothing
    name = name or target.name
    gguf_name = f"{name}-{quantization}.gguf"
    started = time.perf_counter()
    staging = staging_dir(target)
    try:
        with tempfile.TemporaryDirectory(prefix=".gguf-merged-", dir=target.parent) as scratch:
            merged = _stage_merged_folder(tuned, Path(scratch))
            log.info("merged the run's weights (%.1f s); converting with llama.cpp", time.perf_counter() - started)
            metadata = _write_metadata(Path(scratch), name, tuned)
            seconds = convert(merged, staging / gguf_name, quantization, metadata)
        if ollama:
            template = conversation_template or ollama_template(tuned.tokenizer.chat_template, tuned.tokenizer)
            parameters = ollama_parameters(tuned.config.generation, tuned.tokenizer)
            text = modelfile_text(gguf_name, template, parameters, usage_notes(tuned.config, tuned.labels))
            (staging / "Modelfile").write_text(text, encoding="utf-8")
        check_output_dir_kind(output_dir, overwrite, "GGUF export folder", GGUF_MARKER)
        replace_output(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size_mb = (target / gguf_name).stat().st_size / 1e6
    log.info("wrote %s (%.0f MB) in %.1f s (conversion %.1f s)", output_dir / gguf_name, size_mb,
             time.perf_counter() - started, seconds)
    return output_dir / gguf_name


def export_run_gguf(
    run_dir: str | Path,
    output_dir: str | Path,
    quantization: Quantization = "f16",
    ollama: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool | None = None,
) -> Path:
    """Load a complete run folder and export it as GGUF (see `export_gguf`); checks come before loading."""
    run_dir = check_complete(run_dir)
    check_exportable(load_run_config(run_dir), merge=True)
    check_output_dir_kind(Path(output_dir), overwrite, "GGUF export folder", GGUF_MARKER, run_dir)
    ensure_converter()  # before the model loads
    return export_gguf(load(run_dir, trust_remote_code), output_dir, quantization, ollama, overwrite)


def export_gguf_format(
    model: TunedModel | str | Path,
    output_dir: str | Path,
    format: ExportFormat,
    quantization: Quantization | None,
    dtype: str | None,
    overwrite: bool,
    trust_remote_code: bool | None,
) -> Path:
    """`tunewright.export` for --format gguf / ollama: a loaded model or a run folder.

    Raises:
        ConfigError: --dtype was given (GGUF sets its tensor type with --quantization).
    """
    if dtype is not None:
        raise ConfigError(f"export --dtype: a {format} export sets its tensor type with --quantization "
                          "(f32, f16, bf16 or q8_0)")
    quantization = quantization or "f16"
    ollama = format == "ollama"
    if isinstance(model, TunedModel):
        return export_gguf(model, output_dir, quantization, ollama, overwrite)
    return export_run_gguf(model, output_dir, quantization, ollama, overwrite, trust_remote_code)
