"""All server settings in one object: command-line flags, each with a MINICPM_* environment variable.

Precedence: command line, then environment, then the defaults below. `python api.py --help`
prints every flag with its variable and default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from minicpm_server.exceptions import StartupError

DEFAULT_MODEL_PATH = Path("/root/autodl-tmp/OpenBMB/MiniCPM-2B-sft-fp32")
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _env(name: str, text: str) -> str:
    return f"{text} [env MINICPM_{name.upper()}]"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MINICPM_",
        cli_prog_name="api.py",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_exit_on_error=True,
        extra="ignore",
    )

    model_path: Path = Field(DEFAULT_MODEL_PATH, description=_env("model_path", "MiniCPM checkpoint directory."))
    demo: bool = Field(
        False,
        description=_env("demo", "Serve a tiny random-weight model on CPU (built once, cached): no GPU, no download."),
    )
    host: str = Field("0.0.0.0", description=_env("host", "Interface to listen on."))
    port: int = Field(6006, ge=1, le=65535, description=_env("port", "Port to listen on."))
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description=_env("device", "auto: CUDA when available."))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description=_env("dtype", "auto: bfloat16 on CUDA, float32 on CPU.")
    )
    api_key: str | None = Field(
        None, description=_env("api_key", "Require 'Authorization: Bearer KEY' on every route but /health.")
    )
    api_key_file: Path | None = Field(
        None,
        description=_env("api_key_file", "Read the API key from this file (keeps it out of ps and shell history)."),
    )
    cors_origins: str | None = Field(
        None, description=_env("cors_origins", "Comma-separated origins allowed cross-origin, or '*'.")
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description=_env("max_body_bytes", "Largest request body; beyond, 413.")
    )
    request_timeout: float = Field(
        600.0,
        ge=0,
        description=_env("request_timeout", "Seconds a request may take (0: no limit); beyond, 504 and cancelled."),
    )
    read_timeout: float = Field(
        30.0,
        ge=0,
        description=_env(
            "read_timeout",
            "Seconds a client may take to send a request's headers and body (0: no limit); beyond, 408 and "
            "the connection closed. Answers, streams included, are not cut by it.",
        ),
    )
    timeout_keep_alive: float = Field(
        5.0, gt=0, description=_env("timeout_keep_alive", "Seconds an idle kept-alive connection stays open.")
    )
    max_connections: int = Field(
        1000,
        ge=0,
        description=_env(
            "max_connections", "Open connections allowed (0: no cap); past it, 503 and the connection closed."
        ),
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description=_env("shutdown_timeout", "On SIGTERM/SIGINT, seconds in-flight requests may finish.")
    )
    testing_fault_injection: bool = Field(
        False, description=_env("testing_fault_injection", "Testing only: enable POST /debug/fault.")
    )
    testing_start_fault: Literal["oom", "fatal"] | None = Field(
        None,
        description=_env(
            "testing_start_fault", "Testing only: inject this fault before the warm-up generation (start-up fails)."
        ),
    )
    log_prompts: bool = Field(False, description=_env("log_prompts", "Log prompt and answer texts (off: counts only)."))
    empty_cache: Literal["idle", "always", "never"] = Field(
        "idle", description=_env("empty_cache", "When to release PyTorch's cached GPU memory.")
    )
    seed: int = Field(0, ge=0, description=_env("seed", "torch.manual_seed at start-up, as the tutorial did."))
    served_model_name: str | None = Field(
        None,
        description=_env("served_model_name", "Model name in /v1 answers (default: the checkpoint's directory name)."),
    )
    max_batch: int = Field(32, ge=1, le=1024, description=_env("max_batch", "Sequences generated together."))
    max_queue: int = Field(256, ge=0, description=_env("max_queue", "Requests that may wait; beyond, 429."))
    max_prefill_tokens: int = Field(
        8192, ge=1, description=_env("max_prefill_tokens", "Prompt tokens admitted per engine step.")
    )
    engine: Literal["auto", "native", "vllm"] = Field(
        "auto",
        description=_env(
            "engine", "Generation backend. auto: vllm when it is installed and the device is CUDA, else native."
        ),
    )
    kv_cache_gb: float | None = Field(
        None,
        gt=0,
        description=_env(
            "kv_cache_gb",
            "KV cache size in GiB, on any device for native, on CPU for vllm. Default on CPU (both): 2 GiB, or one "
            "context window if more; on CUDA see the next.",
        ),
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description=_env(
            "gpu_memory_utilization",
            "vllm: share of GPU memory for weights, activations and the KV cache. native: the KV cache is this "
            "share of the memory free after the weights (less one decode step's attention buffers).",
        ),
    )
    max_model_len: int | None = Field(
        None, ge=16, description=_env("max_model_len", "Context window cap (default: the checkpoint's, 4096).")
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description=_env("tensor_parallel_size", "vllm: GPUs to split each layer across.")
    )
    enable_prefix_caching: bool = Field(
        True,
        description=_env(
            "enable_prefix_caching",
            "Reuse the KV of prompt prefixes seen before (chats resend their history); both engines. native: "
            "cached prefixes live in the KV cache and are evicted, least recently used first, when space is needed.",
        ),
    )
    compile: bool = Field(
        False,
        description=_env(
            "compile",
            "native: compile the decode step (torch.compile; CUDA graphs on CUDA) on first use of each batch "
            "bucket, logged; eager if compiling fails. Off by default: on a 2-core CPU compiling takes minutes.",
        ),
    )
    cpu_kernels: bool = Field(
        True,
        description=_env(
            "cpu_kernels",
            "native on x86-64 CPUs with AVX2: our own matrix products for float32, bfloat16 and int8 weights, "
            "reading float32 and bfloat16 weights where they are, in the checkpoint file's mapping (compiled once "
            "with the system's g++ into the cache; about 2 s). Off, or where they cannot be built: PyTorch's "
            "products, with float32 layers packed for oneDNN (--packing).",
        ),
    )
    packing: Literal["after-start", "at-load"] = Field(
        "after-start",
        description=_env(
            "packing",
            "native on CPU without our kernels (--no-cpu-kernels), float32 models 512 or more wide: when the "
            "linear layers are re-laid out for oneDNN's faster products. after-start: the server is ready first, "
            "computing from the checkpoint's memory mapping, and the engine packs the layers between steps and "
            "while idle (MiniCPM-2B: ready sooner; until packing ends, answers may differ from later ones in float "
            "rounding). at-load: every layer is packed before the server is ready.",
        ),
    )
    model_impl: Literal["auto", "minicpm", "transformers"] = Field(
        "auto",
        description=_env(
            "model_impl",
            "native: whose module tree runs the prefill. minicpm: our own plain-PyTorch MiniCPM (ready about "
            "3 s sooner on a CPU: transformers' modelling code is never imported). transformers: transformers' "
            "Granite classes (the same math). auto: minicpm on CPU, transformers on CUDA.",
        ),
    )
    mixed_prefill: bool = Field(
        False,
        description=_env(
            "mixed_prefill",
            "native: compute newcomers' prompts in the running rows' decode pass (one pass reads the weights "
            "once; lean decode step only, not with --compile or prompt scoring). Off by default: no gain measured yet.",
        ),
    )
    quantization: Literal["none", "int8", "fp8"] | None = Field(
        None,
        description=_env(
            "quantization",
            "Quantize the weights as they load. native: 'int8' (weight-only, per-channel scales; CPU and CUDA). "
            "vllm: 'fp8' (Ada/Hopper GPUs). none: the --dtype weights.",
        ),
    )
    quantize_head: bool = Field(
        False,
        description=_env(
            "quantize_head",
            "native, with --quantization int8: quantize the output head and the embedding table it is tied to "
            "as well (about 2 GB less memory for MiniCPM-2B on CPU, further from float32). Off by default: like "
            "GPTQ and AWQ checkpoints, the head stays in --dtype, which keeps int8 at least as close to float32 "
            "as llama.cpp's Q8_0 (BENCHMARKS.md).",
        ),
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description=_env("log_level", "Log level."))

    @property
    def model_name(self) -> str:
        return self.served_model_name or (self.model_path.name or "minicpm")

    @property
    def allowed_origins(self) -> list[str]:
        return [o.strip() for o in (self.cors_origins or "").split(",") if o.strip()]

    @property
    def public_interface(self) -> bool:
        return self.host not in LOOPBACK_HOSTS and not self.host.startswith("127.")


def parse_settings(argv: list[str]) -> Settings:
    """Settings from the command line and environment; invalid values raise StartupError."""
    try:
        settings = Settings(_cli_parse_args=argv)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'-'.join(str(p) for p in err['loc']).replace('_', '-') or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise StartupError(f"invalid settings: {problems}") from None
    if settings.api_key_file is not None:
        settings = settings.model_copy(update={"api_key": _read_key_file(settings.api_key_file)})
    return settings


def _read_key_file(path: Path) -> str:
    try:
        key = path.expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"cannot read --api-key-file {path}: {exc}") from None
    if not key:
        raise StartupError(f"--api-key-file {path} is empty")
    return key
