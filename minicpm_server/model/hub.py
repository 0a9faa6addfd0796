"""Fetch MiniCPM-2B from ModelScope or Hugging Face, verified, and optionally convert it.

The clients (modelscope, huggingface_hub) do the transfer, resume interrupted files with Range
requests and draw their own progress bars. Around them we add what a 10.9 GB download on a rented
machine needs: a disk-space check before starting, our own check of every file's size and hash
against the hub's listing afterwards (a bad file is fetched once more, then refused and deleted),
a check that the result is a loadable MiniCPM-2B, and an optional bfloat16 safetensors copy.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from minicpm_server.exceptions import first_line as _first_line

log = logging.getLogger("minicpm_server.model.hub")

VARIANTS: dict[str, dict[str, str]] = {
    "sft-fp32": {"modelscope": "OpenBMB/MiniCPM-2B-sft-fp32", "hf": "openbmb/MiniCPM-2B-sft-fp32"},
    # ModelScope names the sft bf16 repository differently.
    "sft-bf16": {"modelscope": "OpenBMB/miniCPM-bf16", "hf": "openbmb/MiniCPM-2B-sft-bf16"},
    "dpo-bf16": {"modelscope": "OpenBMB/MiniCPM-2B-dpo-bf16", "hf": "openbmb/MiniCPM-2B-dpo-bf16"},
    "dpo-fp16": {"modelscope": "OpenBMB/MiniCPM-2B-dpo-fp16", "hf": "openbmb/MiniCPM-2B-dpo-fp16"},
    "dpo-fp32": {"modelscope": "OpenBMB/MiniCPM-2B-dpo-fp32", "hf": "openbmb/MiniCPM-2B-dpo-fp32"},
}
_FREE_SPACE_MARGIN = 256 * 1024 * 1024  # leave room for temporary files and the system
_HASH_CHUNK = 8 * 1024 * 1024


class DownloadError(Exception):
    """A failure the user can act on; printed as one line."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None
    git_sha1: str | None = None  # Hugging Face lists only git's blob hash for small, non-LFS files


class Source(Protocol):
    name: str
    default_revision: str

    def endpoint(self) -> str: ...

    def list_files(self, model_id: str, revision: str) -> list[RemoteFile]: ...

    def fetch(self, model_id: str, revision: str, local_dir: Path) -> None: ...


# --------------------------------------------------------------------------- sources


class ModelScopeSource:
    name = "modelscope"
    default_revision = "master"

    def endpoint(self) -> str:
        return os.environ.get("MODELSCOPE_ENDPOINT", "https://www.modelscope.cn")

    def list_files(self, model_id: str, revision: str) -> list[RemoteFile]:
        with self._errors(model_id, revision):
            try:  # modelscope >= 1.40: the new client keeps each file's sha256
                from modelscope_hub import HubApi as NewHubApi
            except ImportError:
                from modelscope.hub.api import HubApi

                entries = HubApi().get_model_files(model_id, revision=revision, recursive=True)
                return [
                    RemoteFile(e["Path"], int(e.get("Size") or 0), e.get("Sha256") or None)
                    for e in entries
                    if e.get("Type", "blob") == "blob"
                ]
            files = NewHubApi().list_repo_files(model_id, "model", revision=revision, recursive=True)
        return [RemoteFile(f.path, int(f.size or 0), f.sha256 or None) for f in files if f.type == "blob"]

    def fetch(self, model_id: str, revision: str, local_dir: Path) -> None:
        from modelscope import snapshot_download

        with self._errors(model_id, revision):
            snapshot_download(model_id, revision=revision, local_dir=str(local_dir))

    def _errors(self, model_id: str, revision: str) -> _ErrorMap:
        return _ErrorMap("ModelScope", self.endpoint(), model_id, revision)


class HuggingFaceSource:
    name = "hf"
    default_revision = "main"

    def endpoint(self) -> str:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")

    def list_files(self, model_id: str, revision: str) -> list[RemoteFile]:
        from huggingface_hub import HfApi

        with _ErrorMap("Hugging Face", self.endpoint(), model_id, revision):
            info = HfApi(endpoint=self.endpoint()).model_info(model_id, revision=revision, files_metadata=True)
        return [
            RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None, None if s.lfs else s.blob_id)
            for s in info.siblings or ()
        ]

    def fetch(self, model_id: str, revision: str, local_dir: Path) -> None:
        from huggingface_hub import snapshot_download

        with _ErrorMap("Hugging Face", self.endpoint(), model_id, revision):
            snapshot_download(repo_id=model_id, revision=revision, local_dir=str(local_dir), endpoint=self.endpoint())


SOURCES: dict[str, type[ModelScopeSource] | type[HuggingFaceSource]] = {
    "modelscope": ModelScopeSource,
    "hf": HuggingFaceSource,
}


class _ErrorMap:
    """Turn the clients' many exception types into one-line DownloadErrors."""

    def __init__(self, hub: str, endpoint: str, model_id: str, revision: str) -> None:
        self.hub, self.endpoint, self.model_id, self.revision = hub, endpoint, model_id, revision

    def __enter__(self) -> _ErrorMap:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, DownloadError):
            return False
        raise self._translate(exc) from None

    def _translate(self, exc: Exception) -> DownloadError:
        name = type(exc).__name__
        text = _first_line(exc)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return DownloadError(f"the disk is full: {exc.filename or 'while writing the model'}")
        if (
            name in ("RepositoryNotFoundError", "RevisionNotFoundError", "NotExistError")
            or " 404" in text
            or "404 " in text
        ):
            return DownloadError(f"model {self.model_id} (revision {self.revision}) was not found on {self.endpoint}")
        if "Integrity" in name or "sha256" in text.lower():
            return DownloadError(f"a file of {self.model_id} failed its integrity check while downloading: {text}")
        if _is_connection_error(exc):
            return DownloadError(
                f"cannot reach {self.hub} at {self.endpoint} ({name}); check the network, or point "
                f"{'MODELSCOPE_ENDPOINT' if self.hub == 'ModelScope' else 'HF_ENDPOINT'} at a mirror"
            )
        return DownloadError(f"downloading {self.model_id} from {self.endpoint} failed: {name}: {text}")


def _is_connection_error(exc: BaseException) -> bool:
    import requests

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(
            seen, (ConnectionError, TimeoutError, requests.exceptions.ConnectionError, requests.exceptions.Timeout)
        ):
            return True
        if type(seen).__name__ in ("LocalEntryNotFoundError", "ConnectError", "ConnectTimeout", "NetworkError"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# --------------------------------------------------------------------------- checks


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_disk_space(files: list[RemoteFile], target: Path, extra: int = 0) -> None:
    """Refuse before downloading when what is still missing will not fit."""
    missing = sum(f.size for f in files if not _has_size(target / f.path, f.size)) + extra
    free = shutil.disk_usage(_existing_ancestor(target)).free
    if missing + _FREE_SPACE_MARGIN > free and missing > 0:
        raise DownloadError(
            f"not enough disk space in {_existing_ancestor(target)}: the download needs {human_size(missing)} "
            f"more (plus {human_size(_FREE_SPACE_MARGIN)} spare), only {human_size(free)} is free"
        )


def _has_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def file_matches(path: Path, remote: RemoteFile) -> bool:
    if not _has_size(path, remote.size):
        return False
    if remote.sha256:
        digest = hashlib.sha256()
    elif remote.git_sha1:
        digest = hashlib.sha1(b"blob %d\0" % remote.size, usedforsecurity=False)
    else:
        return True  # the hub gave no hash for this file: its size is all we can check
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest() == (remote.sha256 or remote.git_sha1)


def mismatched_files(files: list[RemoteFile], target: Path) -> list[RemoteFile]:
    return [f for f in files if not file_matches(target / f.path, f)]


def check_model(target: Path) -> None:
    """The directory must be a MiniCPM-2B that api.py can load: config, weight headers, tokenizer."""
    from minicpm_server.model.checkpoint import CheckpointError, inspect_checkpoint, load_tokenizer

    try:
        load_tokenizer(inspect_checkpoint(target))
    except CheckpointError as exc:
        raise DownloadError(str(exc)) from None


# --------------------------------------------------------------------------- conversion

_COPIED_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def converted_dir(target: Path) -> Path:
    return target.with_name(target.name + "-bf16-safetensors")


def convert_to_bf16_safetensors(source: Path, dest: Path) -> Path:
    """Write a bfloat16 safetensors copy of a checkpoint: half the disk of fp32, memory-mapped loading."""
    import torch
    from safetensors.torch import save_file

    from minicpm_server.model.checkpoint import inspect_checkpoint

    files = inspect_checkpoint(source)
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    for weight_file in files.weight_files:
        if weight_file.suffix == ".safetensors":
            from safetensors.torch import load_file

            part = load_file(str(weight_file))
        else:
            part = torch.load(weight_file, map_location="cpu", mmap=True, weights_only=True)
        tensors.update({name: t.to(torch.bfloat16).contiguous() for name, t in part.items()})
        del part
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    config = dict(files.config, torch_dtype="bfloat16")
    (staging / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in _COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, staging / name)
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)  # only a complete copy ever carries the final name
    return dest


# --------------------------------------------------------------------------- the whole download


@dataclass
class DownloadSummary:
    path: Path
    files: int
    bytes: int
    seconds: float
    converted: Path | None = None


def download(
    source: Source, model_id: str, revision: str, cache_dir: Path, convert: str | None = None
) -> DownloadSummary:
    start = time.monotonic()
    target = Path(cache_dir).expanduser() / model_id
    files = source.list_files(model_id, revision)
    if not files:
        raise DownloadError(f"{model_id} (revision {revision}) lists no files on {source.endpoint()}")
    weights = sum(f.size for f in files if f.path.endswith((".bin", ".safetensors")))
    check_disk_space(files, target, extra=weights // 2 if convert else 0)
    target.mkdir(parents=True, exist_ok=True)
    bad = mismatched_files(files, target)
    if bad:
        _fetch(source, model_id, revision, target)
        bad = mismatched_files(files, target)
    if bad:  # a file that is corrupt on disk is fetched once more
        _remove(target, bad)
        _fetch(source, model_id, revision, target)
        bad = mismatched_files(files, target)
    if bad:
        _remove(target, bad)  # never leave a corrupt file where api.py would load it
        raise DownloadError(
            f"{bad[0].path} does not match the size and sha256 the hub lists, after fetching it twice; "
            "the hub's copy may be corrupt: try again later or another --source"
        )
    check_model(target)
    converted = convert_to_bf16_safetensors(target, converted_dir(target)) if convert else None
    return DownloadSummary(target, len(files), sum(f.size for f in files), time.monotonic() - start, converted)


def _fetch(source: Source, model_id: str, revision: str, target: Path) -> None:
    try:
        source.fetch(model_id, revision, target)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DownloadError(f"the disk is full while writing {target}") from None
        raise


def _remove(target: Path, files: list[RemoteFile]) -> None:
    for f in files:
        (target / f.path).unlink(missing_ok=True)
