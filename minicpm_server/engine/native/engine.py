"""The generation engine: continuous batching over one transformers model, on its own thread.

Design, chosen by measurement (BENCHMARKS.md): on a 2-core CPU probe (16 requests of 48 tokens on
a 25M-parameter MiniCPM-shaped model) a plain batched forward over all running sequences ran 2.6x
faster than transformers' own continuous batching manager, which also cannot apply a repetition
penalty per request (the tutorial's defaults need one). So the engine drives the model itself:

* One thread owns the model. Every iteration it admits waiting requests (up to `max_batch`
  running sequences), prefills the newcomers together, joins them to the running batch, and then
  runs one decode step for every running sequence at once. A new request therefore waits at most
  one step, never for a whole batch to finish.
* The running batch is left-padded: one KV cache of shape [batch, heads, time, head_dim] per
  layer, an attention mask marking real tokens, and per-row position ids. Joining pads the
  shorter side on the left; leaving drops rows and trims columns no row needs any more.
* Sampling is per row (sampling.py): temperature, top-k, top-p, repetition penalty, greedy, and
  a private random generator for requests that give a seed.
* Text leaves through an incremental detokenizer that never splits a UTF-8 character; stop
  strings are held back while they might still be forming.
* Requests reach the engine from the event loop through `submit` (the Engine protocol of
  engine/protocol.py), which returns a handle whose events arrive on that loop's queue.
  Cancelling a handle frees its row before the next step.
* Any exception inside a step fails the requests in flight (EngineError, which the server maps
  to 503), drops the batch, releases cached GPU memory, and the loop carries on.

The engine knows nothing of HTTP.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from minicpm_server.engine.handle import Event, Failed, QueueHandle, emit_all
from minicpm_server.engine.native.kvcache import GrowableCache
from minicpm_server.engine.native.rows import RowState
from minicpm_server.engine.native.sampling import BatchSampling, sample_next_tokens
from minicpm_server.engine.output import TokenOutput
from minicpm_server.engine.protocol import (
    EngineError,
    EngineStats,
    EngineUnavailableError,
    FaultKind,
    Finished,
    GenerationRequest,
    QueueFullError,
    check_fits,
)
from minicpm_server.exceptions import one_line
from minicpm_server.model.tokenizer import Tokenizer

log = logging.getLogger("minicpm_server.engine.native.engine")


class EngineKilled(BaseException):
    """Escapes the per-step error handling, so the engine thread dies (tests of a dead engine)."""


# --------------------------------------------------------------------------- per-sequence state


@dataclass
class _Sequence:
    handle: QueueHandle
    output: TokenOutput


@dataclass
class _Rows(RowState):
    """Everything kept per running sequence; a new per-row field needs no other edit."""

    seqs: list[_Sequence]
    last: torch.Tensor  # [B] long, the token fed into the next step
    positions: torch.Tensor  # [B] long, its position id
    seen: torch.Tensor  # [B, V] bool, tokens in each context (repetition penalty)
    counts: torch.Tensor  # [B, V] int32, times each token was generated (presence/frequency penalties)
    sampling: BatchSampling


@dataclass
class _Batch:
    """The running sequences and their left-padded model state."""

    rows: _Rows
    cache: GrowableCache
    mask: torch.Tensor  # [B, T] long, 1 = real token

    @property
    def seqs(self) -> list[_Sequence]:
        return self.rows.seqs


# --------------------------------------------------------------------------- the engine


class NativeEngine:
    """Our own engine (see the module docstring); implements engine.protocol.Engine."""

    name = "native"

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        *,
        context_window: int,
        eos_token_id: int,
        max_batch: int = 32,
        max_queue: int = 256,
        max_prefill_tokens: int = 8192,
        empty_cache: str = "idle",
        seed: int | None = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device: torch.device = next(model.parameters()).device
        self.vocab_size = int(model.config.vocab_size)
        self._cache_kwarg = cache_argument_name(model)
        self.context_window = context_window
        self.eos_token_id = eos_token_id
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.empty_cache = empty_cache
        self._counters = EngineStats()
        self._shared_generator = torch.Generator(device=self.device)
        if seed is not None:
            self._shared_generator.manual_seed(seed)
        self._waiting: deque[QueueHandle] = deque()
        self._batch: _Batch | None = None
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pending_fault: BaseException | None = None
        self._admitting: list[QueueHandle] = []  # taken from the queue, not yet in the batch
        self._released_since_busy = True

    # ----------------------------------------------------------------- public, any thread

    @property
    def num_running(self) -> int:
        """Sequences in the batch plus those being prefilled to join it: a request whose first
        token has been sent is counted, even while its prefill's join is still under way."""
        batch = self._batch
        return (len(batch.seqs) if batch is not None else 0) + len(self._admitting)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def stats(self) -> EngineStats:
        c = self._counters
        return EngineStats(self.num_running, self.num_waiting, c.failures, c.cache_releases, dict(c.finished))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="minicpm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still waiting or running fail with EngineUnavailableError."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def inject_fault(self, kind: FaultKind) -> None:
        """Make the next model step fail: "oom" as CUDA running out of memory, "fatal" killing the thread."""
        if kind == "oom":
            self._pending_fault = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        else:
            self._pending_fault = EngineKilled("injected fatal fault")

    def submit(self, request: GenerationRequest) -> QueueHandle:
        """Queue a request; call from the event loop that will read its events."""
        if not self.alive:
            raise EngineUnavailableError("the generation engine is not running")
        check_fits(request, self.context_window)
        handle = QueueHandle(request)
        with self._cv:
            if self._stopping:  # died or stopped since the check above
                raise EngineUnavailableError("the generation engine is not running")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})"
                )
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    # ----------------------------------------------------------------- the loop, engine thread

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    newcomers = self._next_work()
                    if newcomers is None:
                        return
                    self._admitting = newcomers
                    try:
                        self._raise_injected_fault()
                        if newcomers:
                            self._admit(newcomers)
                        if self._batch is not None:
                            self._decode_step()
                    except Exception as exc:  # every failure must reach the requests
                        self._fail_in_flight(newcomers, exc)
                    self._admitting = []
        except BaseException as exc:
            log.critical("the generation engine thread died: %s", type(exc).__name__)
            raise
        finally:
            # Whatever ended the loop, nobody may wait forever for an answer.
            with self._cv:
                self._stopping = True
                self._cancel_everything()

    def _next_work(self) -> list[QueueHandle] | None:
        """Block until there is something to do; return the requests to admit now (None = stop)."""
        with self._cv:
            while not self._stopping and self._batch is None and not self._waiting:
                self._on_idle()
                self._cv.wait(timeout=1.0)
            if self._stopping:
                self._cancel_everything()
                return None
            self._released_since_busy = False
            return self._take_waiting()

    def _take_waiting(self) -> list[QueueHandle]:
        free = self.max_batch - self.num_running
        taken: list[QueueHandle] = []
        budget = self.max_prefill_tokens
        while self._waiting and len(taken) < free:
            head = self._waiting[0]
            if head.cancelled:
                self._waiting.popleft()
                self._emit_all([(head, Finished("cancelled", head.prompt_tokens, 0))])
                continue
            if taken and head.prompt_tokens > budget:
                break
            budget -= head.prompt_tokens
            taken.append(self._waiting.popleft())
        return taken

    def _raise_injected_fault(self) -> None:
        fault, self._pending_fault = self._pending_fault, None
        if fault is not None:
            raise fault

    # ----------------------------------------------------------------- prefill and join

    def _admit(self, handles: list[QueueHandle]) -> None:
        prompts = [h.prompt_ids for h in handles]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = GrowableCache(self.model.config.num_hidden_layers)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
        )
        cache.zero_padding(mask)
        seen = torch.zeros(len(handles), self.vocab_size, dtype=torch.bool, device=self.device)
        seen[mask.bool().nonzero(as_tuple=True)[0], ids[mask.bool()]] = True
        generators = [self._request_generator(h.params.seed) for h in handles]
        rows = _Rows(
            seqs=[self._new_sequence(h) for h in handles],
            last=ids[:, -1],
            positions=torch.tensor([len(p) for p in prompts], device=self.device),
            seen=seen,
            counts=torch.zeros(len(handles), self.vocab_size, dtype=torch.int32, device=self.device),
            sampling=BatchSampling.build([h.params for h in handles], generators, self.device),
        )
        joining = _Batch(rows, cache, mask)
        first = sample_next_tokens(out.logits[:, -1].float(), seen, rows.sampling, self._shared_generator, rows.counts)
        self._accept_tokens(joining, first)
        joined = joining if self._batch is None else self._join(self._batch, joining)
        self._admitting = []  # counted in the batch from here on
        self._batch = joined
        self._drop_finished()

    def _new_sequence(self, handle: QueueHandle) -> _Sequence:
        return _Sequence(handle, TokenOutput(self.tokenizer, handle.params, handle.prompt_tokens, self.eos_token_id))

    def _request_generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=self.device).manual_seed(seed)

    @staticmethod
    def _join(a: _Batch, b: _Batch) -> _Batch:
        width = max(a.mask.shape[1], b.mask.shape[1])

        def left_pad(mask: torch.Tensor) -> torch.Tensor:
            return F.pad(mask, (width - mask.shape[1], 0))

        return _Batch(
            rows=_Rows.concat(a.rows, b.rows),
            cache=GrowableCache.concat(a.cache, b.cache, width),
            mask=torch.cat([left_pad(a.mask), left_pad(b.mask)]),
        )

    # ----------------------------------------------------------------- decode

    def _decode_step(self) -> None:
        batch = self._batch
        assert batch is not None
        ones = torch.ones(len(batch.seqs), 1, dtype=batch.mask.dtype, device=self.device)
        batch.mask = torch.cat([batch.mask, ones], dim=1)
        rows = batch.rows
        out = self.model(
            input_ids=rows.last[:, None],
            attention_mask=batch.mask,
            position_ids=rows.positions[:, None],
            use_cache=True,
            **{self._cache_kwarg: batch.cache},
        )
        rows.positions = rows.positions + 1
        tokens = sample_next_tokens(
            out.logits[:, -1].float(), rows.seen, rows.sampling, self._shared_generator, rows.counts
        )
        self._accept_tokens(batch, tokens)
        self._drop_finished()

    def _accept_tokens(self, batch: _Batch, tokens: torch.Tensor) -> None:
        """Record each row's new token, turn it into text, and decide whether the row is done."""
        batch.rows.last = tokens
        every_row = torch.arange(len(tokens), device=self.device)
        batch.rows.seen[every_row, tokens] = True
        batch.rows.counts[every_row, tokens] += 1
        events: list[tuple[QueueHandle, Event]] = []
        for seq, token in zip(batch.seqs, tokens.tolist(), strict=True):
            step = seq.output.end("cancelled") if seq.handle.cancelled else seq.output.push(token)
            events.extend((seq.handle, event) for event in step)
        self._emit_all(events)

    def _drop_finished(self) -> None:
        batch = self._batch
        if batch is None:
            return
        keep = [i for i, s in enumerate(batch.seqs) if not s.output.done]
        if len(keep) == len(batch.seqs):
            return
        if not keep:
            self._batch = None
        else:
            self._batch = self._select_rows(batch, keep)
        if self.empty_cache == "always":
            self._release_cached_memory()

    def _select_rows(self, batch: _Batch, keep: list[int]) -> _Batch:
        rows = torch.tensor(keep, device=self.device)
        mask = batch.mask[rows]
        # Columns that are padding in every remaining row are dead weight for attention.
        start = int(mask.any(dim=0).nonzero()[0].item())
        return _Batch(rows=batch.rows.select(rows, keep), cache=batch.cache.select(rows, start), mask=mask[:, start:])

    # ----------------------------------------------------------------- failures, idle, shutdown

    def _fail_in_flight(self, newcomers: list[QueueHandle], exc: Exception) -> None:
        self._counters.failures += 1
        log.error("generation step failed: %s", one_line(exc))
        handles = [s.handle for s in self._batch.seqs] if self._batch is not None else []
        handles += [h for h in newcomers if h not in handles]
        self._batch = None
        error = EngineError(_describe_failure(exc))
        self._emit_all([(h, Failed(error)) for h in handles])
        self._release_cached_memory()

    def _cancel_everything(self) -> None:
        running = [s.handle for s in self._batch.seqs] if self._batch is not None else []
        handles = list(self._waiting) + running + [h for h in self._admitting if h not in running]
        self._waiting.clear()
        self._batch = None
        self._admitting = []
        error = EngineUnavailableError(
            "the generation engine stopped (the server is shutting down or failed); retry later"
        )
        self._emit_all([(h, Failed(error)) for h in handles])

    def _on_idle(self) -> None:
        if self.empty_cache == "idle" and not self._released_since_busy:
            self._release_cached_memory()
            self._released_since_busy = True

    def _release_cached_memory(self) -> None:
        self._counters.cache_releases += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _emit_all(self, events: list[tuple[QueueHandle, Event]]) -> None:
        """Count finished requests by reason, then hand the events to their event loops."""
        for _, event in events:
            if isinstance(event, Finished):
                self._counters.finished[event.reason] += 1
        emit_all(events)


def cache_argument_name(model: Any) -> str:
    """transformers 5 renamed forward's `past_key_values` to `cache` part-way through the 5.x
    releases (5.19 has the old name, 5.24 the new), and an unknown keyword is silently swallowed,
    so ask the model which one it takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _describe_failure(exc: Exception) -> str:
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "the GPU ran out of memory while generating; retry, or send shorter or fewer requests"
    return f"generation failed inside the engine ({type(exc).__name__}); retry the request"
