"""A Granite-format copy of a MiniCPM checkpoint, for engines that load a directory themselves.

vLLM reads a model directory and picks its model class from config.json. MiniCPM's config names
remote code (`auto_map`), which we never run; its math is Granite's (checkpoint.granite_config).
So the vLLM backend loads a directory we write once: config.json from our mapping (no
`auto_map`), the weights as safetensors under the names Granite uses, which are MiniCPM's own
names (the head stays tied to the embeddings, as in MiniCPM), and the tokenizer files. Safetensors
sources are linked, not copied; pickled `.bin` weights are converted once, tensor names and
values unchanged (read with `weights_only`, so no pickled code runs).

The directory sits beside the checkpoint (`<name>-granite`), or in the user cache where that
folder cannot be written, and is reused while a stamp of the source files still matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from minicpm_server.model.checkpoint import CheckpointError, CheckpointFiles, granite_config

log = logging.getLogger("minicpm_server")

EXPORT_FORMAT = 1  # bump when the layout written below changes, so old copies are rebuilt
STAMP_FILE = "minicpm-export.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json")


def default_export_dir(checkpoint: Path) -> Path:
    """Beside the checkpoint when its parent is writable, else in the user's cache."""
    checkpoint = checkpoint.resolve()
    if os.access(checkpoint.parent, os.W_OK):
        return checkpoint.parent / f"{checkpoint.name}-granite"
    digest = hashlib.sha1(str(checkpoint).encode()).hexdigest()[:10]
    return Path.home() / ".cache" / "minicpm-server" / "granite" / f"{checkpoint.name}-{digest}"


def granite_directory(files: CheckpointFiles, dest: Path | None = None) -> Path:
    """The Granite-format directory for `files`, written now unless an up-to-date one exists."""
    dest = dest or default_export_dir(files.path)
    stamp = source_stamp(files)
    if _read_stamp(dest) == stamp:
        log.info("using the Granite-format copy in %s (up to date)", dest)
        return dest
    start = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        _write_export(files, staging)
        (staging / STAMP_FILE).write_text(json.dumps(stamp, indent=1), encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"cannot write the Granite-format copy of {files.path} to {dest}: {exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote the Granite-format copy of %s to %s in %.1f s", files.path, dest, time.perf_counter() - start)
    return dest


def source_stamp(files: CheckpointFiles) -> dict[str, Any]:
    """What the copy was made from: each source file's size and modification time."""
    names = ["config.json", *(p.name for p in files.weight_files)]
    names += [n for n in TOKENIZER_FILES if (files.path / n).is_file()]
    entries = {}
    for name in names:
        info = (files.path / name).stat()
        entries[name] = [info.st_size, info.st_mtime_ns]
    return {"format": EXPORT_FORMAT, "source": str(files.path.resolve()), "files": entries}


def _read_stamp(dest: Path) -> dict[str, Any] | None:
    try:
        return json.loads((dest / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_export(files: CheckpointFiles, out: Path) -> None:
    config = granite_config(files.config).to_dict()
    config["torch_dtype"] = config["dtype"] = _source_dtype(files.config)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tied = bool(config.get("tie_word_embeddings", True))
    if all(p.suffix == ".safetensors" for p in files.weight_files):
        _link_safetensors(files, out)
    else:
        _convert_pickled(files.weight_files, out, drop_head=tied)
    _copy_tokenizer(files.path, out)


def _source_dtype(config: dict[str, Any]) -> str:
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    return str(dtype).removeprefix("torch.")


def _link_safetensors(files: CheckpointFiles, out: Path) -> None:
    for source in files.weight_files:
        (out / source.name).symlink_to(source.resolve())
    index = files.path / "model.safetensors.index.json"
    if index.is_file():
        shutil.copyfile(index, out / index.name)


def _convert_pickled(weight_files: tuple[Path, ...], out: Path, *, drop_head: bool) -> None:
    """Each .bin shard -> one .safetensors shard, names and values unchanged."""
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    names = (
        ["model.safetensors"]
        if len(weight_files) == 1
        else [f"model-{i:05d}-of-{len(weight_files):05d}.safetensors" for i in range(1, len(weight_files) + 1)]
    )
    for source, name in zip(weight_files, names, strict=True):
        state = torch.load(source, map_location="cpu", mmap=True, weights_only=True)
        if drop_head:  # a tied head is the embedding matrix: vLLM ties it, safetensors refuses shared storage
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(state, name))
        del state
    if len(names) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def _copy_tokenizer(source: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if not (source / name).is_file():
            continue
        if name == "tokenizer_config.json":  # may name remote tokenizer code: keep the data, drop the code
            data = json.loads((source / name).read_text(encoding="utf-8"))
            data.pop("auto_map", None)
            (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
        else:
            shutil.copyfile(source / name, out / name)
