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

import asyncio
import contextlib
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from minicpm_server.engine.detokenize import IncrementalDetokenizer
from minicpm_server.engine.native.kvcache import GrowableCache
from minicpm_server.engine.native.rows import RowState
from minicpm_server.engine.native.sampling import BatchSampling, sample_next_tokens
from minicpm_server.engine.protocol import (
    EngineError,
    EngineStats,
    EngineUnavailableError,
    FaultKind,
    Finished,
    GenerationRequest,
    QueueFullError,
    SamplingParams,
    TextDelta,
    check_fits,
)
from minicpm_server.engine.stops import first_stop, stop_prefix_overlap
from minicpm_server.exceptions import one_line
from minicpm_server.model.tokenizer import Tokenizer

log = logging.getLogger("minicpm_server.engine.native.engine")


class EngineKilled(BaseException):
    """Escapes the per-step error handling, so the engine thread dies (tests of a dead engine)."""


# --------------------------------------------------------------------------- events


@dataclass
class Failed:
    error: Exception


Event = TextDelta | Finished | Failed


class GenerationHandle:
    """The caller's side of one request: its events, on the event loop that submitted it."""

    def __init__(self, request_id: int, request: GenerationRequest) -> None:
        self.id = request_id
        self.prompt_ids = request.prompt_ids
        self.params = request.params
        self.cancelled = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def cancel(self) -> None:
        """Free this request's slot; the engine drops it before its next step."""
        self.cancelled = True

    def _deliver(self, event: Event) -> None:
        self._queue.put_nowait(event)

    async def events(self) -> AsyncIterator[TextDelta | Finished]:
        """Text deltas, then one Finished; raises EngineError if generation failed."""
        while True:
            event = await self._queue.get()
            if isinstance(event, Failed):
                raise event.error
            yield event
            if isinstance(event, Finished):
                return


# --------------------------------------------------------------------------- per-sequence state


@dataclass
class _Sequence:
    handle: GenerationHandle
    detok: IncrementalDetokenizer
    stops: tuple[str, ...]
    text: str = ""  # decoded so far, including what is held back for stop strings
    emitted: int = 0  # how much of `text` has been sent
    generated: int = 0
    finish: str | None = None

    @property
    def params(self) -> SamplingParams:
        return self.handle.params


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
        self._waiting: deque[GenerationHandle] = deque()
        self._batch: _Batch | None = None
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._pending_fault: BaseException | None = None
        self._admitting: list[GenerationHandle] = []  # taken from the queue, not yet in the batch
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

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Queue a request; call from the event loop that will read its events."""
        if not self.alive:
            raise EngineUnavailableError("the generation engine is not running")
        check_fits(request, self.context_window)
        handle = GenerationHandle(next(self._ids), request)
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

    def _next_work(self) -> list[GenerationHandle] | None:
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

    def _take_waiting(self) -> list[GenerationHandle]:
        free = self.max_batch - self.num_running
        taken: list[GenerationHandle] = []
        budget = self.max_prefill_tokens
        while self._waiting and len(taken) < free:
            head = self._waiting[0]
            if head.cancelled:
                self._waiting.popleft()
                self._emit_all([(head, self._finished(head, "cancelled", 0))])
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

    def _admit(self, handles: list[GenerationHandle]) -> None:
        prompts = [h.prompt_ids for h in handles]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = GrowableCache(self.model.config.num_hidden_layers)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
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

    def _new_sequence(self, handle: GenerationHandle) -> _Sequence:
        return _Sequence(handle, IncrementalDetokenizer(self.tokenizer), tuple(s for s in handle.params.stop if s))

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
            cache=batch.cache,
            use_cache=True,
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
        events: list[tuple[GenerationHandle, Event]] = []
        for seq, token in zip(batch.seqs, tokens.tolist(), strict=True):
            if seq.handle.cancelled:
                seq.finish = "cancelled"
                continue
            seq.generated += 1
            if token == self.eos_token_id and not seq.params.ignore_eos:
                seq.finish = "stop"
            else:
                seq.text += seq.detok.push(token)
                if seq.generated >= seq.params.max_new_tokens:
                    seq.finish = "length"
            if seq.finish is not None:
                seq.text += seq.detok.flush()
            events.extend(self._text_events(seq))
        self._emit_all(events)

    def _text_events(self, seq: _Sequence) -> list[tuple[GenerationHandle, Event]]:
        """The delta that is safe to send now, and Finished when the row is done."""
        cut = first_stop(seq.text, seq.stops, seq.emitted)
        if cut is not None:
            seq.text, seq.finish = seq.text[:cut], "stop"
        safe = len(seq.text) if seq.finish else len(seq.text) - stop_prefix_overlap(seq.text, seq.stops)
        events: list[tuple[GenerationHandle, Event]] = []
        if safe > seq.emitted:
            events.append((seq.handle, TextDelta(seq.text[seq.emitted : safe], seq.generated)))
            seq.emitted = safe
        if seq.finish:
            events.append((seq.handle, self._finished(seq.handle, seq.finish, seq.generated)))
        return events

    def _finished(self, handle: GenerationHandle, reason: str, generated: int) -> Finished:
        self._counters.finished[reason] += 1
        return Finished(reason, handle.prompt_tokens, generated)

    def _drop_finished(self) -> None:
        batch = self._batch
        if batch is None:
            return
        done = [s for s in batch.seqs if s.finish is not None]
        for seq in done:
            if seq.finish == "cancelled":
                self._emit_all([(seq.handle, self._finished(seq.handle, "cancelled", seq.generated))])
        if not done:
            return
        keep = [i for i, s in enumerate(batch.seqs) if s.finish is None]
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

    def _fail_in_flight(self, newcomers: list[GenerationHandle], exc: Exception) -> None:
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

    @staticmethod
    def _emit_all(events: list[tuple[GenerationHandle, Event]]) -> None:
        """Hand events to their event loops, one wake-up per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationHandle, Event]]] = {}
        for handle, event in events:
            by_loop.setdefault(handle._loop, []).append((handle, event))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is listening any more
                loop.call_soon_threadsafe(_deliver_all, items)


def _deliver_all(items: list[tuple[GenerationHandle, Event]]) -> None:
    for handle, event in items:
        handle._deliver(event)


def _describe_failure(exc: Exception) -> str:
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "the GPU ran out of memory while generating; retry, or send shorter or fewer requests"
    return f"generation failed inside the engine ({type(exc).__name__}); retry the request"
