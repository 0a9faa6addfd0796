"""Where the project keeps what it builds once and reuses: the demo checkpoint, compiled CPU
kernels, remembered tokenizer checks. `$XDG_CACHE_HOME/minicpm-server`, else ~/.cache/minicpm-server."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minicpm-server"
