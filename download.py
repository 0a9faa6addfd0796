"""Download MiniCPM-2B from ModelScope to where `python api.py` looks for it.

    python download.py          # OpenBMB/MiniCPM-2B-sft-fp32 -> /root/autodl-tmp/OpenBMB/MiniCPM-2B-sft-fp32

The files land in CACHE_DIR/MODEL_ID (pass --cache-dir and --model-id to change either), which
is api.py's default --model-path for the default model. The last line printed on stdout is the
model's local path, so scripts can do `MODEL=$(python download.py | tail -n 1)`.
MODELSCOPE_ENDPOINT points the client at a mirror.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_MODEL_ID = "OpenBMB/MiniCPM-2B-sft-fp32"
DEFAULT_CACHE_DIR = "/root/autodl-tmp"


class DownloadError(Exception):
    """A failure the user can act on; printed as one line."""


def local_dir_for(cache_dir: str | Path, model_id: str) -> Path:
    """CACHE_DIR/Owner/Name: a stable place, whatever layout the modelscope version prefers."""
    return Path(cache_dir).expanduser() / model_id


def download(model_id: str, cache_dir: str | Path, revision: str) -> Path:
    import requests
    from modelscope import snapshot_download

    target = local_dir_for(cache_dir, model_id)
    endpoint = os.environ.get("MODELSCOPE_ENDPOINT", "https://www.modelscope.cn")
    try:
        path = snapshot_download(model_id, revision=revision, local_dir=str(target))
    except requests.exceptions.HTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status == 404 or " 404" in str(exc):
            raise DownloadError(f"model {model_id} (revision {revision}) was not found on {endpoint}") from None
        raise DownloadError(f"the hub at {endpoint} refused the download: {_first_line(exc)}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError) as exc:
        # modelscope_hub's NetworkError subclasses the builtin ConnectionError, requests' does not.
        raise DownloadError(
            f"cannot reach ModelScope at {endpoint} ({type(exc).__name__}); check the network, "
            "or set MODELSCOPE_ENDPOINT to a mirror"
        ) from None
    except OSError as exc:
        raise DownloadError(f"cannot write the model to {target}: {exc.strerror or exc}") from None
    return Path(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download MiniCPM-2B from ModelScope.")
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID, help=f"ModelScope model id ({DEFAULT_MODEL_ID})")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help=f"download root ({DEFAULT_CACHE_DIR})")
    parser.add_argument("--revision", default="master", help="branch, tag or commit (master)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        path = download(args.model_id, args.cache_dir, args.revision)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    files = [p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts]
    size_gb = sum(p.stat().st_size for p in files) / 1e9
    print(f"{len(files)} files, {size_gb:.2f} GB in {time.monotonic() - start:.0f} s", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
