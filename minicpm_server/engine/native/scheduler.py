"""The scheduler: which requests run. The queue, admission by rows, prefill tokens and KV blocks,
and rows joining and leaving the batch. It runs no model (runner.py does) and sends no events
(engine.py does); it is called on the engine thread, and under the engine's lock where the
queue is shared with `submit`.

Admission is first come, first served: the queue's head is admitted while there is a free row,
room in this step's prefill budget (--max-prefill-tokens; the first newcomer always fits) and KV
space for its prompt plus its whole token budget. When the head does not fit, later requests
wait too, so a long request is never starved by short ones. Reserving the whole budget up front
means a running request never runs out of KV memory half-way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from minicpm_server.engine.handle import QueueHandle
from minicpm_server.engine.native.blocks import BlockPool
from minicpm_server.engine.output import TokenOutput

if TYPE_CHECKING:
    from minicpm_server.engine.native.runner import Batch


@dataclass
class Sequence:
    """One running request: its output so far and its KV blocks."""

    handle: QueueHandle
    output: TokenOutput
    table: list[int]  # KV blocks reserved for the prompt plus the whole token budget
    tokens: list[int]  # prompt, then generated ids: the content of `table`'s slots
    computed: int = 0  # tokens whose keys and values are in the cache
    digests: list[bytes] = field(default_factory=list)  # prefix-index chain of its full blocks
    matcher: Any = None  # xgrammar's matcher of a constrained request: which tokens may come next


@dataclass
class Admission:
    """A request taken from the queue with its KV reserved; `cached` prompt tokens are reused."""

    handle: QueueHandle
    table: list[int]
    cached: int


class Scheduler:
    """Queue and batch bookkeeping for the native engine (see the module docstring)."""

    def __init__(
        self,
        pool: BlockPool,
        *,
        max_batch: int,
        max_prefill_tokens: int,
        copy_block: Callable[[int, int], None],
    ) -> None:
        self.pool = pool
        self.copy_block = copy_block  # (source, destination): a cached block's keys and values into a fresh one
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[QueueHandle] = deque()
        self.batch: Batch | None = None
        self.admitting: list[Admission] = []  # taken from the queue, not yet in the batch
        self.prefilled_tokens = 0  # prompt tokens actually computed
        self.waited_for_memory = 0  # times the queue's head had to wait for KV space

    @property
    def num_running(self) -> int:
        """Rows in the batch plus those being prefilled to join it: a request whose first token
        has been sent is counted, even while its prefill's join is still under way."""
        batch = self.batch
        return (len(batch.seqs) if batch is not None else 0) + len(self.admitting)

    @property
    def idle(self) -> bool:
        return self.batch is None and not self.waiting

    # ----------------------------------------------------------------- admission

    def take_waiting(self) -> tuple[list[Admission], list[QueueHandle]]:
        """Admit from the head of the queue (module docstring); also returns the requests that
        were cancelled while they waited, now out of the queue."""
        free = self.max_batch - self.num_running
        taken: list[Admission] = []
        cancelled: list[QueueHandle] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(taken) < free:
            head = self.waiting[0]
            if head.cancelled:
                cancelled.append(self.waiting.popleft())
                continue
            if taken and head.prompt_tokens > budget:
                break
            # A prompt to be scored is computed whole: cached blocks have keys and values, not logits.
            reuse = head.params.prompt_logprobs is None
            reserved = self.pool.reserve(head.prompt_ids, head.prompt_tokens + head.params.max_new_tokens, reuse=reuse)
            if reserved is None:
                self.waited_for_memory += 1
                break
            if reserved.copy is not None:  # the prompt's tokens past its shared blocks agree with a cached block
                self.copy_block(*reserved.copy)  # before the next reservation, which may evict the source
            budget -= head.prompt_tokens - reserved.cached
            taken.append(Admission(self.waiting.popleft(), reserved.table, reserved.cached))
        self.admitting = taken
        return taken, cancelled

    def prefilled(self, seqs: list[Sequence]) -> None:
        """The sequences' prompts are in the cache: their full blocks become findable prefixes."""
        for seq in seqs:
            self.prefilled_tokens += len(seq.tokens) - seq.computed
            seq.computed = len(seq.tokens)
            self.pool.index(seq.table, seq.tokens, seq.computed, seq.digests)

    # ----------------------------------------------------------------- rows joining and leaving

    def join(self, joining: Batch) -> None:
        """Newcomers join the running batch (rows are independent: joining copies no KV)."""
        self.batch = joining if self.batch is None else type(joining).concat(self.batch, joining)
        self.admitting = []  # counted in the batch from here on

    def decoded(self) -> None:
        """Every row's last token went into the cache in this step."""
        assert self.batch is not None
        for seq in self.batch.seqs:
            seq.computed += 1

    def drop_finished(self) -> bool:
        """Finished rows leave the batch; their KV blocks go back to the pool, full ones kept
        findable as a cached prefix (a chat's next turn resends this prompt and answer).
        True when some row left."""
        batch = self.batch
        if batch is None:
            return False
        keep = [i for i, s in enumerate(batch.seqs) if not s.output.done]
        if len(keep) == len(batch.seqs):
            return False
        for seq in batch.seqs:
            if seq.output.done:
                self.pool.index(seq.table, seq.tokens, seq.computed, seq.digests, finished=True)
                self.pool.release(seq.table)
        self.batch = batch.select(keep) if keep else None
        return True

    # ----------------------------------------------------------------- failures and shutdown

    def drop_in_flight(self) -> list[QueueHandle]:
        """After a failed step: every running or admitted request leaves, its blocks freed; their
        handles, to fail."""
        seqs = self.batch.seqs if self.batch is not None else []
        handles = [s.handle for s in seqs]
        for seq in seqs:
            self.pool.release(seq.table)
        for admission in self.admitting:
            if admission.handle not in handles:  # reserved, not yet joined
                handles.append(admission.handle)
                self.pool.release(admission.table)
        self.batch = None
        self.admitting = []
        return handles

    def drop_everything(self) -> list[QueueHandle]:
        """On shutdown: the waiting, running and admitted requests' handles, all forgotten."""
        running = [s.handle for s in self.batch.seqs] if self.batch is not None else []
        admitting = [a.handle for a in self.admitting]
        handles = list(self.waiting) + running + [h for h in admitting if h not in running]
        self.waiting.clear()
        self.batch = None
        self.admitting = []
        return handles
