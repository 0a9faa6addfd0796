"""What every backend does the same way, kept once: counting, the queue limit, faults, failure text.

A backend (native, vllm, a third one) inherits `EngineBase` and gets:

* `counters`: failed steps, cache releases and finished requests by reason, which `emit` counts
  as the events leave, so no backend counts them itself;
* `check_queue(waiting)`: the one meaning of `--max-queue` (below);
* `inject_fault(kind)`: the testing hook of `--testing-fault-injection`; "oom" arms an error that
  the backend raises at its next step (`raise_injected_fault`), read by `describe_failure` exactly
  as CUDA's own out-of-memory error; "fatal" calls the backend's `kill_for_test`;
* `describe_failure(exc)`: the one sentence a client reads when a step fails.

`--max-queue` means, on every backend: how many accepted requests may wait for a batch row. A
request that finds `--max-batch` requests running and `--max-queue` waiting gets 429 at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from minicpm_server.engine.handle import Event, emit_all
from minicpm_server.engine.protocol import EngineStats, FaultKind, Finished, GenerationRequest, QueueFullError

if TYPE_CHECKING:
    from minicpm_server.engine.handle import QueueHandle

GIB = 1 << 30
# The KV cache's size on CPU when --kv-cache-gb is not given, on both backends: 2 GiB, or one full
# context window when that is more, so that any request the window allows fits.
CPU_KV_DEFAULT_GB = 2.0


def default_cpu_kv_bytes(window_bytes: int) -> int:
    return max(int(CPU_KV_DEFAULT_GB * GIB), window_bytes)


OUT_OF_MEMORY_MESSAGE = "the GPU ran out of memory while generating; retry, or send shorter or fewer requests"


class InjectedOutOfMemory(RuntimeError):
    """What an armed "oom" fault raises: worded as CUDA's own error, so it takes the same path."""

    def __init__(self) -> None:
        super().__init__("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def is_out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError, vLLM's wrapped errors and our injected one all say so in their text.
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def describe_failure(exc: BaseException) -> str:
    """The client's sentence for a failed step: what happened and what to do."""
    if is_out_of_memory(exc):
        return OUT_OF_MEMORY_MESSAGE
    return f"generation failed inside the engine ({type(exc).__name__}); retry the request"


class EngineBase:
    """The bookkeeping part of the Engine protocol (engine/protocol.py) that every backend shares."""

    name = "base"

    def __init__(self, *, max_batch: int, max_queue: int) -> None:
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.counters = EngineStats()
        self._armed_fault: BaseException | None = None

    def reset_counters(self) -> None:
        """Start counting from zero (after the warm-up generation, which is not traffic)."""
        self.counters = EngineStats()

    # ----------------------------------------------------------------- admission

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Off the event loop: check the request's constraint compiles (a 400 otherwise). A backend
        that compiles grammars itself overrides this and attaches the compiled one."""
        if request.params.constraint is not None:
            from minicpm_server.engine.grammar import to_grammar

            to_grammar(request.params.constraint)
        return request

    def check_queue(self, waiting: int) -> None:
        """429 for a request that would be one more than --max-queue waiting for a row."""
        if waiting >= self.max_queue:
            raise QueueFullError(f"{waiting} requests are already waiting (--max-queue {self.max_queue})")

    # ----------------------------------------------------------------- faults (testing only)

    def inject_fault(self, kind: FaultKind) -> None:
        """ "oom": the next step fails as if CUDA ran out of memory; "fatal": the engine dies."""
        if kind == "oom":
            self._armed_fault = InjectedOutOfMemory()
        else:
            self.kill_for_test()

    def kill_for_test(self) -> None:
        """Make the engine die the way a real crash would; each backend says how."""
        raise NotImplementedError

    def arm_fault(self, fault: BaseException) -> None:
        """Raise `fault` at the next step (a backend's own kind of fatal fault, say)."""
        self._armed_fault = fault

    def raise_injected_fault(self) -> None:
        fault, self._armed_fault = self._armed_fault, None
        if fault is not None:
            raise fault

    # ----------------------------------------------------------------- events out

    def emit(self, events: list[tuple[QueueHandle, Event]]) -> None:
        """Count finished requests by reason, then hand the events to their event loops."""
        for _, event in events:
            if isinstance(event, Finished):
                self.counters.finished[event.reason] += 1
        emit_all(events)

    def snapshot(self, running: int, waiting: int, **kv: int | None) -> EngineStats:
        """The stats the metrics read: the counters now, with the backend's own gauges."""
        c = self.counters
        return EngineStats(running, waiting, c.failures, c.cache_releases, dict(c.finished), **kv)
