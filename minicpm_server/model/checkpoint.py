"""Turn a MiniCPM-2B checkpoint directory into a model and tokenizer we can serve.

No transformers release has a MiniCPM class, and the download's remote code no longer runs on
current transformers (and would run code shipped with a download). MiniCPM's forward pass is
exactly transformers' Granite architecture with four scalars set from MiniCPM's config
(architecture.model_config; docs/architecture.md has the mapping). So the model is either our
own plain-PyTorch MiniCPM (architecture.py: the default on CPU, where importing transformers'
modelling code is seconds of start-up) or transformers' `GraniteForCausalLM` built from that
config (the default on CUDA, and what vLLM is given, export.py). Either way config.json's
`auto_map` is never consulted, and we never pass `trust_remote_code`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minicpm_server.exceptions import StartupError
from minicpm_server.exceptions import one_line as _one_line
from minicpm_server.model.architecture import model_config
from minicpm_server.model.loading import DENSE, LinearForm
from minicpm_server.model.tokenizer import Tokenizer, TokenizerError
from minicpm_server.model.tokenizer import load_tokenizer as load_checkpoint_tokenizer

log = logging.getLogger("minicpm_server")

DEFAULT_DOWNLOAD_HINT = (
    "run `python download.py` first: it downloads OpenBMB/MiniCPM-2B-sft-fp32 from ModelScope into "
    "/root/autodl-tmp/OpenBMB/MiniCPM-2B-sft-fp32, the default --model-path (or try `python api.py --demo`)"
)
_REQUIRED_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "scale_emb",
    "dim_model_base",
    "scale_depth",
)


class CheckpointError(StartupError):
    """The model directory is missing, is not MiniCPM-2B, or is incomplete or unreadable."""


@dataclass(frozen=True)
class CheckpointFiles:
    path: Path
    config: dict[str, Any]
    weight_files: tuple[Path, ...]


@dataclass
class LoadedCheckpoint:
    model: Any
    tokenizer: Tokenizer
    files: CheckpointFiles
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str

    @property
    def context_window(self) -> int:
        return int(self.files.config.get("max_position_embeddings", 4096))

    @property
    def eos_token_id(self) -> int:
        return int(self.files.config.get("eos_token_id", 2))


# --------------------------------------------------------------------------- inspection


def inspect_checkpoint(path: str | Path) -> CheckpointFiles:
    """Cheap checks that the directory holds a complete MiniCPM-2B checkpoint; no weights are read."""
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"model path {root} does not exist; {DEFAULT_DOWNLOAD_HINT}")
    if not root.is_dir():
        raise CheckpointError(f"model path {root} is a file; pass the checkpoint directory that holds config.json")
    config = _read_config(root)
    check_minicpm_family(config, root)
    weights = _find_weight_files(root)
    if not any((root / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(
            f"no tokenizer in {root}: expected tokenizer.json or tokenizer.model (incomplete download?)"
        )
    _check_weight_names(root, config, _read_weight_names(weights))
    return CheckpointFiles(root, config, weights)


def _read_weight_names(files: tuple[Path, ...]) -> set[str]:
    """Tensor names from each file's header only: a memory-mapped torch.load reads the zip
    directory and the pickle, not the data, so even the 10.9 GB file is checked in moments."""
    names: set[str] = set()
    for file in files:
        try:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(file), framework="pt") as handle:
                    names.update(handle.keys())
            else:
                names.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True).keys())
        except Exception as exc:  # truncated zips, bad headers and unpicklable content raise many types
            raise CheckpointError(
                f"cannot read the weights in {file}: {_one_line(exc)} (incomplete download?)"
            ) from None
    return names


def expected_weight_names(config: dict[str, Any]) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    per_layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [
        f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")
    ]
    per_layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    for n in range(int(config["num_hidden_layers"])):
        names.update(f"model.layers.{n}.{suffix}" for suffix in per_layer)
    if not config.get("tie_word_embeddings", True):
        names.add("lm_head.weight")
    return names


def _check_weight_names(root: Path, config: dict[str, Any], found: set[str]) -> None:
    missing = sorted(expected_weight_names(config) - found)
    if missing:
        shown = ", ".join(missing[:3])
        raise CheckpointError(f"the weights in {root} are incomplete: {len(missing)} tensors missing ({shown}, ...)")


def _read_config(root: Path) -> dict[str, Any]:
    file = root / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{root} has no config.json, so it is not a model checkpoint; {DEFAULT_DOWNLOAD_HINT}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return config


def check_minicpm_family(config: dict[str, Any], root: Path | str = "the checkpoint") -> None:
    """Refuse anything whose math differs from MiniCPM-2B's, naming what was found."""
    model_type = config.get("model_type")
    found = f"model_type {model_type!r}, architectures {config.get('architectures')}"
    if model_type != "minicpm":
        raise CheckpointError(
            f"{root} is not a MiniCPM-2B-family checkpoint ({found}); this server runs MiniCPM-2B "
            "(model_type 'minicpm'), not MiniCPM3, MiniCPM-V, Llama or others"
        )
    if config.get("num_experts"):
        raise CheckpointError(
            f"{root} is a mixture-of-experts MiniCPM ({config['num_experts']} experts): not supported"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{root} uses hidden_act {config['hidden_act']!r}; only MiniCPM-2B's 'silu' is supported")
    if config.get("rope_scaling"):
        raise CheckpointError(
            f"{root} uses rope_scaling {config['rope_scaling']}; only MiniCPM-2B's plain RoPE is supported"
        )
    missing = [name for name in _REQUIRED_FIELDS if name not in config]
    if missing:
        raise CheckpointError(f"{root}/config.json lacks {', '.join(missing)} ({found}); not a MiniCPM-2B config")


def _find_weight_files(root: Path) -> tuple[Path, ...]:
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = root / index_name
        if index.is_file():
            return _shards_from_index(index)
        if (root / single_name).is_file():
            return (root / single_name,)
    others = sorted(root.glob("*.safetensors")) or sorted(root.glob("*.bin"))
    if others:
        names = ", ".join(p.name for p in others)
        raise CheckpointError(f"{root} has weight files ({names}) but no index that says how they fit together")
    raise CheckpointError(
        f"no weights in {root}: expected pytorch_model.bin or model.safetensors (or sharded files with an index); "
        "the download may be incomplete"
    )


def _shards_from_index(index: Path) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read weight index {index}: {exc!r}") from None
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise CheckpointError(f"weight shards listed in {index.name} are missing: {', '.join(missing)}")
    return tuple(index.parent / n for n in names)


# --------------------------------------------------------------------------- config mapping


def granite_config(config: dict[str, Any]) -> Any:
    """MiniCPM config -> the transformers GraniteConfig with the same forward pass
    (architecture.model_config has the mapping)."""
    from transformers import GraniteConfig

    return GraniteConfig(**model_config(config).granite_kwargs())


# --------------------------------------------------------------------------- device and dtype


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise StartupError(
            f"--device cuda was asked for but no CUDA GPU is usable (torch {torch.__version__}); "
            "check nvidia-smi, or use --device cpu"
        )
    return torch.device(choice)


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[choice]


MODEL_IMPLEMENTATIONS = ("auto", "minicpm", "transformers")


def model_implementation(choice: str, device: torch.device) -> str:
    """auto: our own MiniCPM on CPU (ready seconds sooner: no transformers modelling import),
    transformers' Granite on CUDA (its attention kernels, measured there before ours existed)."""
    if choice not in MODEL_IMPLEMENTATIONS:
        raise StartupError(
            f"unknown model implementation {choice!r}: expected one of {', '.join(MODEL_IMPLEMENTATIONS)}"
        )
    if choice == "auto":
        return "minicpm" if device.type == "cpu" else "transformers"
    return choice


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """flash-attn on CUDA when it is installed and the dtype allows it, PyTorch SDPA otherwise."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


# --------------------------------------------------------------------------- loading


def load_tokenizer(files: CheckpointFiles) -> Tokenizer:
    """sentencepiece on tokenizer.model when there is one, else tokenizer.json (tokenizer.py)."""
    try:
        return load_checkpoint_tokenizer(files.path)
    except TokenizerError as exc:
        raise CheckpointError(f"cannot load the tokenizer from {files.path}: {exc}") from None


def load_model(
    files: CheckpointFiles,
    device: torch.device,
    dtype: torch.dtype,
    attn: str,
    form: LinearForm = DENSE,
    implementation: str = "minicpm",
) -> Any:
    """The model with the checkpoint's weights, streamed in one tensor at a time (loading.py),
    its linear layers taking `form` as they are read: packed for oneDNN where the native engine
    would pack them anyway (engine/native/packed.py; now, or after start-up with `form.later`),
    so no dense copy is ever made of them; or quantized to int8 (engine/native/quantized.py)."""
    from minicpm_server.engine.native.packed import packs_weights
    from minicpm_server.model.loading import load_streaming

    config = model_config(files.config) if implementation == "minicpm" else granite_config(files.config)
    if form.kind == "packed" and not packs_weights(device, config.hidden_size, dtype):
        form = DENSE
    try:
        model, missing, report = load_streaming(config, files.weight_files, device, dtype, attn, form)
    except Exception as exc:  # corrupt pickles and truncated files surface as many exception types
        raise CheckpointError(f"cannot read the weights in {files.path}: {_one_line(exc)}") from None
    if missing:  # never serve a model with holes in it
        shown = ", ".join(sorted(missing)[:4])
        raise CheckpointError(
            f"the weights in {files.path} are incomplete: {len(missing)} tensors missing ({shown}, ...)"
        )
    log.info("weights: %s", report.summary())
    return model


@dataclass(frozen=True)
class Preflight:
    """What is checked before the server listens, so a bad path or device fails in one line."""

    files: CheckpointFiles
    device: torch.device


def preflight(path: str | Path, device: str = "auto") -> Preflight:
    return Preflight(inspect_checkpoint(path), resolve_device(device))


def load_checkpoint(
    path: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    *,
    checked: Preflight | None = None,
    form: LinearForm = DENSE,
    implementation: str = "auto",
) -> LoadedCheckpoint:
    """Load the model and tokenizer; `checked` (from preflight) skips the checks already made;
    `form` is what the linear layers become as they load (load_model): packed or quantized for
    the native engine's lean decoder; `implementation`: whose module tree (model_implementation)."""
    start = time.perf_counter()
    checked = checked or preflight(path, device)
    files, torch_device = checked.files, checked.device
    torch_dtype = resolve_dtype(dtype, torch_device)
    implementation = model_implementation(implementation, torch_device)
    attn = attention_implementation(torch_device, torch_dtype) if implementation == "transformers" else "sdpa"
    tokenizer = load_tokenizer(files)
    model = load_model(files, torch_device, torch_dtype, attn, form, implementation)
    seconds = time.perf_counter() - start
    whose = "our MiniCPM" if implementation == "minicpm" else "transformers' Granite"
    log.info(
        "loaded %s on %s as %s (%s, %s attention) in %.1f s",
        files.path,
        torch_device,
        torch_dtype,
        whose,
        attn,
        seconds,
    )
    return LoadedCheckpoint(model, tokenizer, files, torch_device, torch_dtype, attn)
