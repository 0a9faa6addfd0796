"""The generation engine: continuous batching over one transformers model, on its own thread.

Design, chosen by measurement (BENCHMARKS.md): on a 2-core CPU probe (16 requests of 48 tokens on
a 25M-parameter MiniCPM-shaped model) a plain batched forward over all running sequences ran 2.6x
faster than transformers' own continuous batching manager, which also cannot apply a repetition
penalty per request (the tutorial's defaults need one). So the engine drives the model itself:

* One thread owns the model. Every iteration it admits waiting requests (up to `max_batch`
  running sequences, `max_prefill_tokens` prompt tokens, and only while their prompt plus token
  budget fit in the free KV memory), prefills the newcomers together, joins them to the running
  batch, and then runs one decode step for every running sequence at once. A new request
  therefore waits at most one step, never for a whole batch to finish, unless memory is full.
* KV memory is a fixed pool of blocks (paged.py, blocks.py) sized at start-up (budget.py): a
  request reserves all the blocks it can need when it is admitted, so memory in use never
  exceeds the budget and a running request never fails for lack of it. Rows are ragged: each
  reads only its own blocks, and padding costs at most the tail of each row's last block.
* Prefix reuse: a finished request's full blocks (prompt and answer) stay in the pool, indexed
  by their tokens, until the space is needed (least recently used first). A chat's next turn
  resends that history, finds those blocks, and prefills only what is new.
* The decode step's forward pass is our own (lean.py): the model's math over its own weights,
  fused and laid out for one token per row, reading the paged KV by whole blocks; it was
  1.5-2.3x faster per step than transformers' forward on the CPU benchmark model. Prefill runs
  transformers' forward. With --compile the decode step is compiled instead (compiled.py):
  static shapes by batch-size and key-length buckets, lean whenever compiling fails.
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

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from minicpm_server.engine.handle import Event, Failed, QueueHandle, emit_all
from minicpm_server.engine.native.blocks import NULL_BLOCK, BlockPool, blocks_for
from minicpm_server.engine.native.budget import GIB, KvShape, pool_blocks
from minicpm_server.engine.native.compiled import DecodeForward
from minicpm_server.engine.native.paged import PagedKVCache, StepLayout, cache_argument_name, prefill_layout
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
    table: list[int]  # KV blocks reserved for the prompt plus the whole token budget
    tokens: list[int]  # prompt, then generated ids: the content of `table`'s slots
    computed: int = 0  # tokens whose keys and values are in the cache
    digests: list[bytes] = field(default_factory=list)  # prefix-index chain of its full blocks


@dataclass
class _Admission:
    """A request taken from the queue with its KV reserved; `cached` prompt tokens are reused."""

    handle: QueueHandle
    table: list[int]
    cached: int


@dataclass
class _Batch(RowState):
    """The running sequences; every field holds one entry per row (rows.py)."""

    seqs: list[_Sequence]
    last: torch.Tensor  # [B] long, the token fed into the next step
    lengths: torch.Tensor  # [B] long, tokens in the cache: the position id of `last`
    table: torch.Tensor  # [B, W] long, block ids (padded with the null block)
    seen: torch.Tensor  # [B, V] bool, tokens in each context (repetition penalty)
    counts: torch.Tensor  # [B, V] int32, times each token was generated (presence/frequency penalties)
    sampling: BatchSampling


@dataclass
class KvStats:
    """The KV pool as the engine sees it (tests and benchmarks read it; not part of the protocol)."""

    capacity_tokens: int
    used_tokens: int  # reserved by requests or held by cached prefixes
    peak_used_tokens: int
    cached_prefix_tokens: int
    prefix_hit_tokens: int  # prompt tokens whose prefill a cached prefix saved
    prefilled_tokens: int  # prompt tokens actually computed
    evictions: int
    waited_for_memory: int  # times the queue's head had to wait for KV space


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
        kv_cache_gb: float | None = None,
        gpu_memory_utilization: float = 0.9,
        kv_cache_tokens: int | None = None,
        block_size: int = 16,
        prefix_caching: bool = True,
        compile: bool = False,
        lean: bool = True,
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
        self._admitting: list[_Admission] = []  # taken from the queue, not yet in the batch
        self._released_since_busy = True
        self._use_sdpa()
        self.block_size = block_size
        self._table_width = blocks_for(context_window, block_size)
        self._pool, self._cache = self._build_kv(kv_cache_gb, gpu_memory_utilization, kv_cache_tokens, prefix_caching)
        self._decode = DecodeForward(
            model,
            self._cache,
            block_size=block_size,
            scratch_slot=self._pool.num_blocks * block_size,
            max_batch=max_batch,
            context_window=context_window,
            compile=compile,
            lean=lean,
        )
        self._prefilled_tokens = 0
        self._waited_for_memory = 0

    def _use_sdpa(self) -> None:
        """The paged cache hands attention a 4-D mask, which FlashAttention-2 cannot take."""
        if self.model.config._attn_implementation not in ("sdpa", "eager"):
            log.info(
                "native engine: %s attention -> sdpa (paged KV needs a 4-D mask)",
                self.model.config._attn_implementation,
            )
            self.model.set_attn_implementation("sdpa")

    def _build_kv(
        self, kv_cache_gb: float | None, utilization: float, tokens: int | None, prefix_caching: bool
    ) -> tuple[BlockPool, PagedKVCache]:
        shape = KvShape.of(self.model)
        if tokens is not None:
            blocks, source = blocks_for(tokens, self.block_size) + 1, "kv_cache_tokens"
        else:
            blocks, source = pool_blocks(
                shape,
                self.device,
                block_size=self.block_size,
                context_window=self.context_window,
                max_batch=self.max_batch,
                kv_cache_gb=kv_cache_gb,
                gpu_memory_utilization=utilization,
            )
        pool = BlockPool(blocks, self.block_size, prefix_caching=prefix_caching)
        # One slot more than the blocks: where the compiled decode step's padding rows write.
        cache = PagedKVCache(
            shape.num_layers, blocks * self.block_size + 1, shape.kv_heads, shape.head_dim, shape.dtype, self.device
        )
        cache.zero_null_block(self.block_size)
        log.info(
            "KV cache: %d tokens (%.2f GiB, %s) in blocks of %d; prefix caching %s",
            pool.capacity_tokens,
            pool.capacity_tokens * shape.bytes_per_token / GIB,
            source,
            self.block_size,
            "on" if prefix_caching else "off",
        )
        return pool, cache

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
        c, pool = self._counters, self._pool
        return EngineStats(
            self.num_running,
            self.num_waiting,
            c.failures,
            c.cache_releases,
            dict(c.finished),
            prefix_hit_tokens=pool.hit_tokens,
            kv_used_tokens=pool.used * self.block_size,
            kv_capacity_tokens=pool.capacity_tokens,
        )

    @property
    def kv_stats(self) -> KvStats:
        pool, size = self._pool, self.block_size
        return KvStats(
            capacity_tokens=pool.capacity_tokens,
            used_tokens=pool.used * size,
            peak_used_tokens=pool.peak_used * size,
            cached_prefix_tokens=pool.cached * size,
            prefix_hit_tokens=pool.hit_tokens,
            prefilled_tokens=self._prefilled_tokens,
            evictions=pool.evictions,
            waited_for_memory=self._waited_for_memory,
        )

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

    def _next_work(self) -> list[_Admission] | None:
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

    def _take_waiting(self) -> list[_Admission]:
        """Admit from the head of the queue while there are rows, prefill room and KV space.

        A request reserves KV for its prompt plus its whole token budget, so a running request
        never runs out of memory. The queue is first come, first served: when its head does not
        fit, later requests wait too (a long request is never starved by short ones).
        """
        free = self.max_batch - self.num_running
        taken: list[_Admission] = []
        budget = self.max_prefill_tokens
        while self._waiting and len(taken) < free:
            head = self._waiting[0]
            if head.cancelled:
                self._waiting.popleft()
                self._emit_all([(head, Finished("cancelled", head.prompt_tokens, 0))])
                continue
            if taken and head.prompt_tokens > budget:
                break
            reserved = self._pool.reserve(head.prompt_ids, head.prompt_tokens + head.params.max_new_tokens)
            if reserved is None:
                self._waited_for_memory += 1
                break
            table, cached = reserved
            budget -= head.prompt_tokens - cached
            taken.append(_Admission(self._waiting.popleft(), table, cached))
        return taken

    def _raise_injected_fault(self) -> None:
        fault, self._pending_fault = self._pending_fault, None
        if fault is not None:
            raise fault

    # ----------------------------------------------------------------- the model

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, layout: StepLayout, **kwargs: Any) -> Any:
        """One forward pass over the paged cache: the layout says where to write and what to read."""
        self._cache.layout = layout
        return self.model(
            input_ids=ids,
            attention_mask=layout.mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kwarg: self._cache},
            **kwargs,
        )

    def _table(self, tables: list[list[int]]) -> torch.Tensor:
        rows = [t + [NULL_BLOCK] * (self._table_width - len(t)) for t in tables]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    # ----------------------------------------------------------------- prefill and join

    def _admit(self, admissions: list[_Admission]) -> None:
        """Prefill the newcomers' uncached prompt tokens together, sample their first tokens, and
        join them to the running batch (rows are independent: joining copies no KV)."""
        prompts = [a.handle.prompt_ids for a in admissions]
        fresh = [block for a in admissions for block in a.table[a.cached // self.block_size :]]
        self._cache.zero_blocks(fresh, self.block_size)
        cached = torch.tensor([a.cached for a in admissions], device=self.device)
        new = torch.tensor([len(p) - a.cached for p, a in zip(prompts, admissions, strict=True)], device=self.device)
        width = int(new.max())
        ids = torch.tensor(
            [[0] * (width - len(p) + a.cached) + p[a.cached :] for p, a in zip(prompts, admissions, strict=True)],
            device=self.device,
        )
        table = self._table([a.table for a in admissions])
        layout = prefill_layout(table, cached, new, self.block_size)
        offsets = torch.arange(width, device=self.device)[None, :] - (width - new)[:, None]
        out = self._forward(ids, (cached[:, None] + offsets).clamp(min=0), layout, logits_to_keep=1)
        self._prefilled_tokens += int(new.sum())
        seen = torch.zeros(len(prompts), self.vocab_size, dtype=torch.bool, device=self.device)
        for row, prompt in enumerate(prompts):
            seen[row, prompt] = True
        generators = [self._request_generator(a.handle.params.seed) for a in admissions]
        joining = _Batch(
            seqs=[self._new_sequence(a) for a in admissions],
            last=ids[:, -1],
            lengths=torch.tensor([len(p) for p in prompts], device=self.device),
            table=table,
            seen=seen,
            counts=torch.zeros(len(prompts), self.vocab_size, dtype=torch.int32, device=self.device),
            sampling=BatchSampling.build([a.handle.params for a in admissions], generators, self.device),
        )
        for seq in joining.seqs:
            seq.computed = len(seq.tokens)
            self._pool.index(seq.table, seq.tokens, seq.computed, seq.digests)
        first = sample_next_tokens(
            out.logits[:, -1].float(), seen, joining.sampling, self._shared_generator, joining.counts
        )
        self._accept_tokens(joining, first)
        joined = joining if self._batch is None else _Batch.concat(self._batch, joining)
        self._admitting = []  # counted in the batch from here on
        self._batch = joined
        self._drop_finished()

    def _new_sequence(self, admission: _Admission) -> _Sequence:
        handle = admission.handle
        output = TokenOutput(self.tokenizer, handle.params, handle.prompt_tokens, self.eos_token_id)
        return _Sequence(handle, output, admission.table, list(handle.prompt_ids))

    def _request_generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=self.device).manual_seed(seed)

    # ----------------------------------------------------------------- decode

    def _decode_step(self) -> None:
        batch = self._batch
        assert batch is not None
        width = max(seq.computed for seq in batch.seqs) + 1
        logits = self._decode(batch.last, batch.lengths, batch.table, width)
        batch.lengths = batch.lengths + 1
        for seq in batch.seqs:
            seq.computed += 1
        tokens = sample_next_tokens(logits.float(), batch.seen, batch.sampling, self._shared_generator, batch.counts)
        self._accept_tokens(batch, tokens)
        self._drop_finished()

    def _accept_tokens(self, batch: _Batch, tokens: torch.Tensor) -> None:
        """Record each row's new token, turn it into text, and decide whether the row is done."""
        batch.last = tokens
        every_row = torch.arange(len(tokens), device=self.device)
        batch.seen[every_row, tokens] = True
        batch.counts[every_row, tokens] += 1
        events: list[tuple[QueueHandle, Event]] = []
        for seq, token in zip(batch.seqs, tokens.tolist(), strict=True):
            seq.tokens.append(token)
            step = seq.output.end("cancelled") if seq.handle.cancelled else seq.output.push(token)
            events.extend((seq.handle, event) for event in step)
        self._emit_all(events)

    def _drop_finished(self) -> None:
        """Finished rows leave the batch; their KV blocks go back to the pool, full ones kept
        findable as a cached prefix (a chat's next turn resends this prompt and answer)."""
        batch = self._batch
        if batch is None:
            return
        keep = [i for i, s in enumerate(batch.seqs) if not s.output.done]
        if len(keep) == len(batch.seqs):
            return
        for seq in batch.seqs:
            if seq.output.done:
                self._pool.index(seq.table, seq.tokens, seq.computed, seq.digests)
                self._pool.release(seq.table)
        self._batch = batch.select(torch.tensor(keep, device=self.device), keep) if keep else None
        if self.empty_cache == "always":
            self._release_cached_memory()

    # ----------------------------------------------------------------- failures, idle, shutdown

    def _fail_in_flight(self, newcomers: list[_Admission], exc: Exception) -> None:
        self._counters.failures += 1
        log.error("generation step failed: %s", one_line(exc))
        seqs = self._batch.seqs if self._batch is not None else []
        handles = [s.handle for s in seqs]
        for seq in seqs:
            self._pool.release(seq.table)
        for admission in newcomers:
            if admission.handle not in handles:  # reserved, not yet joined
                handles.append(admission.handle)
                self._pool.release(admission.table)
        self._batch = None
        error = EngineError(_describe_failure(exc))
        self._emit_all([(h, Failed(error)) for h in handles])
        self._release_cached_memory()

    def _cancel_everything(self) -> None:
        running = [s.handle for s in self._batch.seqs] if self._batch is not None else []
        admitting = [a.handle for a in self._admitting]
        handles = list(self._waiting) + running + [h for h in admitting if h not in running]
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


def _describe_failure(exc: Exception) -> str:
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "the GPU ran out of memory while generating; retry, or send shorter or fewer requests"
    return f"generation failed inside the engine ({type(exc).__name__}); retry the request"
