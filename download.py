"""Download MiniCPM-2B to where `python api.py` looks for it, verified.

    python download.py                          # OpenBMB/MiniCPM-2B-sft-fp32 from ModelScope
                                                # into /root/autodl-tmp/OpenBMB/MiniCPM-2B-sft-fp32
    python download.py --variant dpo-bf16       # another published variant
    python download.py --source hf              # Hugging Face (HF_ENDPOINT for a mirror)
    python download.py --convert bf16-safetensors   # also write a bfloat16 safetensors copy

Files land in CACHE_DIR/MODEL_ID. The last line printed on stdout is the path to pass to
api.py (the converted copy's, with --convert), so scripts can do `MODEL=$(python download.py | tail -n 1)`.
A second run checks what is there and downloads only what is missing or corrupt.
"""

from __future__ import annotations

import argparse
import sys

DEFAULT_CACHE_DIR = "/root/autodl-tmp"


def main(argv: list[str] | None = None) -> int:
    from minicpm_server.model.hub import SOURCES, VARIANTS, DownloadError, download, human_size

    parser = argparse.ArgumentParser(description="Download MiniCPM-2B from ModelScope or Hugging Face.")
    parser.add_argument("--source", choices=sorted(SOURCES), default="modelscope", help="where from (modelscope)")
    parser.add_argument(
        "--variant", choices=list(VARIANTS), default="sft-fp32", help="which published model (sft-fp32)"
    )
    parser.add_argument("--model-id", help="any repository id instead of a variant")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help=f"download root ({DEFAULT_CACHE_DIR})")
    parser.add_argument("--revision", help="branch, tag or commit (master on ModelScope, main on Hugging Face)")
    parser.add_argument("--convert", choices=["bf16-safetensors"], help="also write a converted copy next to it")
    args = parser.parse_args(argv)
    source = SOURCES[args.source]()
    model_id = args.model_id or VARIANTS[args.variant][args.source]
    revision = args.revision or source.default_revision
    print(f"downloading {model_id} ({revision}) from {source.endpoint()}", file=sys.stderr)
    try:
        summary = download(source, model_id, revision, args.cache_dir, args.convert)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    print(
        f"{summary.files} files, {human_size(summary.bytes)}, verified, in {summary.seconds:.0f} s: {summary.path}",
        file=sys.stderr,
    )
    if summary.converted is not None:
        print(f"bfloat16 safetensors copy: {summary.converted}", file=sys.stderr)
        print(summary.converted)
    else:
        print(summary.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
