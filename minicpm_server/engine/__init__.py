"""Generation engines behind one protocol (engine/protocol.py); `create_engine` picks one."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minicpm_server.engine.protocol import Engine
    from minicpm_server.model.checkpoint import LoadedCheckpoint
    from minicpm_server.settings import Settings


def create_engine(settings: Settings, checkpoint: LoadedCheckpoint) -> Engine:
    """The one place a backend is chosen from the settings (today: our native engine)."""
    import torch

    from minicpm_server.engine.native.engine import NativeEngine

    torch.manual_seed(settings.seed)  # the tutorial seeds torch once at start-up; so do we
    return NativeEngine(
        checkpoint.model,
        checkpoint.tokenizer,
        context_window=checkpoint.context_window,
        eos_token_id=checkpoint.eos_token_id,
        max_batch=settings.max_batch,
        max_queue=settings.max_queue,
        max_prefill_tokens=settings.max_prefill_tokens,
        empty_cache=settings.empty_cache,
        seed=settings.seed,
    )
