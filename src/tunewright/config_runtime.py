"""Config sections for running a model: generation, backend, tracking, serving."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunewright.config_section import Section

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
    batch_tokens: int | None = Field(
        None, ge=1, description="Token budget of a generation batch: at most this many KV-cache slots, rows x "
        "(longest prompt + max_new_tokens), within batch_size prompts (a longer prompt goes alone); bounds the "
        "cache's memory when prompt lengths vary. null: batch_size prompts."
    )
    cache: Literal["dynamic", "static"] = Field(
        "dynamic", description="The KV cache: `dynamic` (tunewright's greedy loop; finished rows leave the batch), "
        "or `static`: transformers' fixed-shape cache through `generate`, which on CUDA compiles the decode "
        "step (CUDA graphs; the first batch compiles)."
    )


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
    attention: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto", description="transformers' attn_implementation: `auto` is flash_attention_2 on CUDA when the "
        "flash-attn package is installed (packed rows attend per sample natively), else sdpa."
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
