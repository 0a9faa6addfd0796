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

The code is in three parts: this module drives the loop and owns the thread, the requests'
handles and their events; scheduler.py decides which requests run (queue, admission, rows
joining and leaving); runner.py runs the model (prefill, decode, sampling). What every backend
shares (counters, --max-queue, fault injection, failure text) is engine/base.py's.

The engine knows nothing of HTTP.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import Any

import torch

from minicpm_server.engine.base import EngineBase, describe_failure
from minicpm_server.engine.grammar import GrammarCompiler
from minicpm_server.engine.handle import Event, Failed, QueueHandle
from minicpm_server.engine.native.blocks import BlockPool, blocks_for
from minicpm_server.engine.native.budget import GIB, KvShape, pool_blocks
from minicpm_server.engine.native.paged import PagedKVCache
from minicpm_server.engine.native.runner import Batch, ModelRunner
from minicpm_server.engine.native.scheduler import Admission, Scheduler, Sequence
from minicpm_server.engine.output import TokenOutput
from minicpm_server.engine.protocol import (
    EngineError,
    EngineStats,
    EngineUnavailableError,
    Finished,
    GenerationRequest,
    check_fits,
)
from minicpm_server.exceptions import one_line
from minicpm_server.model.tokenizer import Tokenizer

log = logging.getLogger("minicpm_server.engine.native.engine")


class EngineKilled(BaseException):
    """Escapes the per-step error handling, so the engine thread dies (tests of a dead engine)."""


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


class NativeEngine(EngineBase):
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
        mixed_prefill: bool = False,
    ) -> None:
        super().__init__(max_batch=max_batch, max_queue=max_queue)
        self.tokenizer = tokenizer
        self.context_window = context_window
        self.eos_token_id = eos_token_id
        self.empty_cache = empty_cache
        self.block_size = block_size
        _use_sdpa(model)
        pool, cache = _build_kv(
            model,
            block_size=block_size,
            context_window=context_window,
            max_batch=max_batch,
            kv_cache_gb=kv_cache_gb,
            utilization=gpu_memory_utilization,
            tokens=kv_cache_tokens,
            prefix_caching=prefix_caching,
        )
        self.scheduler = Scheduler(
            pool,
            max_batch=max_batch,
            max_prefill_tokens=max_prefill_tokens,
            copy_block=lambda source, target: cache.copy_block(source, target, block_size),
        )
        self.runner = ModelRunner(
            model,
            cache,
            block_size=block_size,
            scratch_slot=pool.num_blocks * block_size,
            max_batch=max_batch,
            context_window=context_window,
            compile=compile,
            lean=lean,
            mixed_prefill=mixed_prefill,
            seed=seed,
        )
        self._cv = threading.Condition()  # guards the scheduler's queue, shared with submit()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._released_since_busy = True
        # Layers left to pack after start-up (packed.py) wait for the first step (the server's
        # warm-up), so that packing never delays readiness.
        self._may_pack = False
        self._grammars: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()

    # ----------------------------------------------------------------- public, any thread

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def stats(self) -> EngineStats:
        pool = self.scheduler.pool
        return self.snapshot(
            self.num_running,
            self.num_waiting,
            prefix_hit_tokens=pool.hit_tokens,
            prefix_query_tokens=pool.query_tokens,
            kv_used_tokens=pool.used * self.block_size,
            kv_capacity_tokens=pool.capacity_tokens,
        )

    @property
    def kv_stats(self) -> KvStats:
        pool, size = self.scheduler.pool, self.block_size
        return KvStats(
            capacity_tokens=pool.capacity_tokens,
            used_tokens=pool.used * size,
            peak_used_tokens=pool.peak_used * size,
            cached_prefix_tokens=pool.cached * size,
            prefix_hit_tokens=pool.hit_tokens,
            prefilled_tokens=self.scheduler.prefilled_tokens,
            evictions=pool.evictions,
            waited_for_memory=self.scheduler.waited_for_memory,
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

    def kill_for_test(self) -> None:
        self.arm_fault(EngineKilled("injected fatal fault"))

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Compile the request's constraint against our vocabulary (cached), off the engine thread:
        a new schema can take a second to compile, which would stall every running row."""
        if request.params.constraint is None:
            return request
        return replace(request, grammar=self._grammar_compiler().compile(request.params.constraint))

    def _grammar_compiler(self) -> GrammarCompiler:
        with self._grammar_lock:  # made on first use: building it reads the whole vocabulary
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer, self.runner.vocab_size, self.eos_token_id)
            return self._grammars

    def submit(self, request: GenerationRequest) -> QueueHandle:
        """Queue a request; call from the event loop that will read its events."""
        if not self.alive:
            raise EngineUnavailableError("the generation engine is not running")
        check_fits(request, self.context_window)
        handle = QueueHandle(request)
        with self._cv:
            if self._stopping:  # died or stopped since the check above
                raise EngineUnavailableError("the generation engine is not running")
            self.check_queue(len(self.scheduler.waiting))
            self.scheduler.waiting.append(handle)
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
                    try:
                        if newcomers or not self.scheduler.idle:
                            self._step(newcomers)
                            self._may_pack = True
                    except Exception as exc:  # every failure must reach the requests
                        self._fail_in_flight(exc)
                    if self._may_pack:  # one layer left to pack after start-up: between steps, or while idle
                        self.runner.packing.pack_next()
        except BaseException as exc:
            # Logged here, with the traceback of a real crash (an injected one needs none); the
            # server notices the dead engine (api/service.py) and exits non-zero.
            injected = isinstance(exc, EngineKilled)
            log.critical("the generation engine thread died: %s", one_line(exc), exc_info=not injected)
        finally:
            # Whatever ended the loop, nobody may wait forever for an answer.
            with self._cv:
                self._stopping = True
                self._cancel_everything()

    def _next_work(self) -> list[Admission] | None:
        """Block until there is something to do; return the requests to admit now (None = stop)."""
        with self._cv:
            while not self._stopping and self.scheduler.idle:
                if self._may_pack and self.runner.packing.left:
                    return []  # pack a layer (outside the lock, so requests can still arrive), then look again
                self._on_idle()
                self._cv.wait(timeout=1.0)
            if self._stopping:
                self._cancel_everything()
                return None
            self._released_since_busy = False
            admitted, cancelled = self.scheduler.take_waiting()
        self.emit([(h, Finished("cancelled", h.prompt_tokens, 0)) for h in cancelled])
        return admitted

    def _step(self, newcomers: list[Admission]) -> None:
        """Admit the newcomers (prefill, first token, join), then one decode step for every row."""
        self.raise_injected_fault()
        if newcomers:
            seqs = [self._new_sequence(a) for a in newcomers]
            if self.runner.can_mix(seqs):
                self._prefill_with_decode(seqs)
                return
            joining, logits, scores = self.runner.prefill(seqs)
            self.scheduler.prefilled(seqs)
            self.emit([(seq.handle, e) for seq, s in zip(seqs, scores, strict=True) for e in seq.output.prefilled(s)])
            self._accept_tokens(joining, logits)
            self.scheduler.join(joining)
            self._drop_finished()
        batch = self.scheduler.batch
        if batch is not None:
            logits = self.runner.decode_step(batch)
            self.scheduler.decoded()
            self._accept_tokens(batch, logits)
            self._drop_finished()

    def _prefill_with_decode(self, seqs: list[Sequence]) -> None:
        """The newcomers' prompts and the running rows' decode step in one pass (mixed.py); the
        newcomers decode from the next step on."""
        running = self.scheduler.batch
        joining, logits, decode_logits = self.runner.prefill_with_decode(seqs, running)
        self.scheduler.prefilled(seqs)
        self.emit([(seq.handle, e) for seq in seqs for e in seq.output.prefilled(None)])
        if running is not None:
            self.scheduler.decoded()
            self._accept_tokens(running, decode_logits)
        self._accept_tokens(joining, logits)
        self.scheduler.join(joining)
        self._drop_finished()

    def _new_sequence(self, admission: Admission) -> Sequence:
        handle = admission.handle
        output = TokenOutput(self.tokenizer, handle.params, handle.prompt_tokens, self.eos_token_id)
        matcher = None if handle.grammar is None else self._grammar_compiler().matcher(handle.grammar)
        table, tokens = admission.table, list(handle.prompt_ids)
        return Sequence(handle, output, table, tokens, computed=admission.cached, matcher=matcher)

    def _accept_tokens(self, batch: Batch, logits: torch.Tensor) -> None:
        """Sample each row's new token, record it, turn it into text, and decide whether the row is done."""
        tokens, ids = self.runner.sample(logits, batch)
        scores = self.runner.logprobs(logits, batch, tokens)
        self.runner.record(batch, tokens)
        events: list[tuple[QueueHandle, Event]] = []
        for seq, token, score in zip(batch.seqs, ids, scores, strict=True):
            seq.tokens.append(token)
            step = seq.output.end("cancelled") if seq.handle.cancelled else seq.output.push(token, score)
            if seq.matcher is not None and not seq.output.done:
                step += self._follow_grammar(seq, token)
            events.extend((seq.handle, event) for event in step)
        self.emit(events)

    @staticmethod
    def _follow_grammar(seq: Sequence, token: int) -> list[Event]:
        """Advance the row's grammar; a complete grammar that allows nothing more (EOS ignored,
        say) ends the answer."""
        if not seq.matcher.accept_token(token):  # the mask allowed it, so this is a bug: end, never loop
            log.error("grammar refused token %d that its own mask allowed; ending the answer", token)
            return list(seq.output.end("stop"))
        return list(seq.output.end("stop")) if seq.matcher.is_terminated() else []

    def _drop_finished(self) -> None:
        if self.scheduler.drop_finished() and self.empty_cache == "always":
            self._release_cached_memory()

    # ----------------------------------------------------------------- failures, idle, shutdown

    def _fail_in_flight(self, exc: Exception) -> None:
        self.counters.failures += 1
        log.error("generation step failed: %s", one_line(exc))
        error = EngineError(describe_failure(exc))
        self.emit([(h, Failed(error)) for h in self.scheduler.drop_in_flight()])
        self._release_cached_memory()

    def _cancel_everything(self) -> None:
        error = EngineUnavailableError(
            "the generation engine stopped (the server is shutting down or failed); retry later"
        )
        self.emit([(h, Failed(error)) for h in self.scheduler.drop_everything()])

    def _on_idle(self) -> None:
        if self.empty_cache == "idle" and not self._released_since_busy:
            self._release_cached_memory()
            self._released_since_busy = True

    def _release_cached_memory(self) -> None:
        self.counters.cache_releases += 1
        self.runner.release_cached_memory()


# --------------------------------------------------------------------------- construction


def _use_sdpa(model: Any) -> None:
    """The paged cache hands attention a 4-D mask, which FlashAttention-2 cannot take (our own
    MiniCPM, model/architecture.py, has only SDPA)."""
    if getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        log.info("native engine: %s attention -> sdpa (paged KV needs a 4-D mask)", model.config._attn_implementation)
        model.set_attn_implementation("sdpa")


def _build_kv(
    model: Any,
    *,
    block_size: int,
    context_window: int,
    max_batch: int,
    kv_cache_gb: float | None,
    utilization: float,
    tokens: int | None,
    prefix_caching: bool,
) -> tuple[BlockPool, PagedKVCache]:
    """The block pool (the scheduler's) and the KV memory it indexes (the runner's), sized once."""
    shape = KvShape.of(model)
    device = next(model.parameters()).device
    if tokens is not None:
        blocks, source = blocks_for(tokens, block_size) + 1, "kv_cache_tokens"
    else:
        blocks, source = pool_blocks(
            shape,
            device,
            block_size=block_size,
            context_window=context_window,
            max_batch=max_batch,
            kv_cache_gb=kv_cache_gb,
            gpu_memory_utilization=utilization,
        )
    pool = BlockPool(blocks, block_size, prefix_caching=prefix_caching)
    # One slot more than the blocks: where the compiled decode step's padding rows write.
    cache = PagedKVCache(shape.num_layers, blocks * block_size + 1, shape.kv_heads, shape.head_dim, shape.dtype, device)
    cache.zero_null_block(block_size)
    log.info(
        "KV cache: %d tokens (%.2f GiB, %s) in blocks of %d; prefix caching %s",
        pool.capacity_tokens,
        pool.capacity_tokens * shape.bytes_per_token / GIB,
        source,
        block_size,
        "on" if prefix_caching else "off",
    )
    return pool, cache
