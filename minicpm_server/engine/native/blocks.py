"""Which KV-cache blocks are free, whose they are, and which hold a reusable prompt prefix.

The KV memory (paged.py) is a fixed pool of blocks of `block_size` token slots. A request
reserves, when it is admitted, every block its prompt plus its `max_new_tokens` can need, so a
running request can never run out of memory half-way; a request that does not fit waits in the
queue. Block 0 is never handed out: it stays zero and is where padding points.

Prefix reuse: a full block whose tokens were computed is indexed by a digest of every token from
the start of the sequence up to its end (a chain: the previous block's digest plus this block's
tokens), so a later prompt that begins with the same tokens finds those blocks and skips their
prefill. Only full blocks are shared and they are never written again, so sharing needs no copy.

Past its last whole shared block, a prompt usually still agrees with some cached block for a few
tokens: the same prompt sent again (its last block is never whole: at least one token is always
computed), a chat's next turn (the previous answer ends mid-block), or two prompts that part
mid-block. Those tokens are reused too, by copy: the reservation's first fresh block receives a
copy of the cached block (`Reservation.copy`, made by the caller before it reserves again), and the
prompt is computed from the first token that differs. To find such blocks, every indexed block
also records its parent's digest and its tokens, and a finished request's last, partly filled
block is kept as well (a partial entry: found only this way, never shared). As llama.cpp's
server and SGLang's radix cache do, this reuses prompts token by token, not block by block
(vLLM's granularity): at MiniCPM-2B's size on a CPU, up to 15 tokens of a repeated prompt are
most of a second.

A block stays indexed after its request ends, holding no reference, in least-recently-used
order; it is evicted (unindexed and reused) only when a reservation needs the space. The digest
is cryptographic: a prompt crafted to collide with another user's prefix would read their KV.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

NULL_BLOCK = 0


class Reservation(NamedTuple):
    """A request's KV blocks; its first `cached` tokens are already computed."""

    table: list[int]
    cached: int
    copy: tuple[int, int] | None = None  # (cached block, table's block): copy the former into the latter first


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def chain_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The identity of a block: every token from the sequence's start up to its end."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    """Block bookkeeping for one engine thread (not thread-safe: only the engine thread calls it)."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least one block besides the null block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._digest_of: dict[int, bytes] = {}  # indexed full block -> its digest
        self._block_of: dict[bytes, int] = {}  # digest -> indexed full block
        self._tokens_of: dict[int, tuple[int, ...]] = {}  # every indexed block (full or partial) -> its tokens
        self._parent_of: dict[int, bytes] = {}  # every indexed block -> the digest of the blocks before it
        self._children: dict[bytes, dict[int, None]] = {}  # parent digest -> indexed blocks that follow it
        self._idle: OrderedDict[int, None] = OrderedDict()  # indexed, unreferenced; oldest first
        self.peak_used = 0
        self.hit_tokens = 0  # prompt tokens whose prefill a cached prefix saved
        self.query_tokens = 0  # prompt tokens looked up in the prefix index (vLLM's "queries")
        self.evictions = 0

    # ----------------------------------------------------------------- sizes

    @property
    def capacity_tokens(self) -> int:
        """Token slots requests can use (the null block excluded)."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def available(self) -> int:
        """Blocks a reservation may take now: free ones plus cached prefixes nobody holds."""
        return len(self._free) + len(self._idle)

    @property
    def used(self) -> int:
        """Blocks holding something: reserved by requests, or a cached prefix."""
        return self.num_blocks - 1 - len(self._free)

    @property
    def cached(self) -> int:
        """Blocks the prefix index holds (full ones and finished requests' partial last blocks)."""
        return len(self._tokens_of)

    # ----------------------------------------------------------------- reserve and release

    def reserve(self, prompt: Sequence[int], total_tokens: int, *, reuse: bool = True) -> Reservation | None:
        """Blocks for a request of `total_tokens` (prompt plus its token budget) whose prompt is
        `prompt`, reusing a cached prefix unless `reuse` is false, or None when it does not fit
        now. At least one prompt token is always left to compute (its logits give the first
        answer token). When the reservation's `copy` is set, the caller copies that block's keys
        and values before its next reservation (which may evict the source)."""
        shared, partial = self._match(prompt) if reuse else ([], None)
        held = shared + ([partial[0]] if partial else [])
        for block in held:
            self._ref(block)  # held, so that taking fresh blocks below cannot evict them
        needed = blocks_for(total_tokens, self.block_size) - len(shared)
        if needed > self.available:
            self.release(held)
            return None
        table = shared + [self._take() for _ in range(needed)]
        self.peak_used = max(self.peak_used, self.used)
        cached_tokens = len(shared) * self.block_size
        copy = None
        if partial:
            source, agreed = partial
            self.release([source])  # copied before the caller's next reservation (docstring)
            copy = (source, table[len(shared)])
            cached_tokens += agreed
        self.hit_tokens += cached_tokens
        if reuse:
            self.query_tokens += len(prompt)
        return Reservation(table, cached_tokens, copy)

    def release(self, table: Sequence[int]) -> None:
        """Drop one reference to each block; an unreferenced block is freed, or kept as a cached
        prefix (evictable) when it is indexed."""
        for block in table:
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._tokens_of:
                self._idle[block] = None
            else:
                self._free.append(block)

    def index(
        self,
        table: Sequence[int],
        tokens: Sequence[int],
        computed: int,
        digests: list[bytes],
        *,
        finished: bool = False,
    ) -> None:
        """Make the full blocks among the first `computed` tokens findable by later prompts, and,
        once the request has `finished` (its blocks are written no more), its partly filled last
        block too, to be copied from (module docstring).

        `digests` is the caller's chain so far (extended here), so indexing a running sequence
        again after more tokens costs only the new blocks.
        """
        if not self.prefix_caching:
            return
        size = self.block_size
        for i in range(len(digests), computed // size):
            parent = digests[-1] if digests else b""
            block_tokens = tuple(tokens[i * size : (i + 1) * size])
            digest = chain_digest(parent, block_tokens)
            digests.append(digest)
            block = table[i]
            if digest not in self._block_of and block not in self._digest_of:
                self._block_of[digest] = block
                self._digest_of[block] = digest
                self._add_entry(block, parent, block_tokens)
        filled = computed % size
        if finished and filled:
            block = table[computed // size]
            parent = digests[-1] if digests else b""
            tail = tuple(tokens[computed - filled : computed])
            if self._longest_agreement(parent, tail)[1] < filled:  # nothing cached covers it yet
                self._add_entry(block, parent, tail)

    # ----------------------------------------------------------------- internals

    def _match(self, prompt: Sequence[int]) -> tuple[list[int], tuple[int, int] | None]:
        """The cached full blocks the prompt begins with, and then the cached block (full or
        partial) that agrees longest with the prompt's next tokens, with how many: (block, n)."""
        if not self.prefix_caching:
            return [], None
        size, found, parent = self.block_size, [], b""
        for i in range((len(prompt) - 1) // size):
            digest = chain_digest(parent, prompt[i * size : (i + 1) * size])
            block = self._block_of.get(digest)
            if block is None:
                break
            found.append(block)
            parent = digest
        start = len(found) * size
        limit = min(size, len(prompt) - 1 - start)  # at least one prompt token is left to compute
        block, agreed = self._longest_agreement(parent, prompt[start : start + limit])
        return found, ((block, agreed) if agreed > 0 else None)

    def _longest_agreement(self, parent: bytes, tokens: Sequence[int]) -> tuple[int, int]:
        """(block, n): the indexed block after `parent` whose first n tokens equal `tokens`' first
        n, with n as large as possible; (NULL_BLOCK, 0) when none does."""
        best, best_n = NULL_BLOCK, 0
        for block in self._children.get(parent, ()):
            cached = self._tokens_of[block]
            n = 0
            for a, b in zip(cached, tokens, strict=False):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = block, n
        return best, best_n

    def _add_entry(self, block: int, parent: bytes, tokens: tuple[int, ...]) -> None:
        self._tokens_of[block] = tokens
        self._parent_of[block] = parent
        self._children.setdefault(parent, {})[block] = None

    def _ref(self, block: int) -> None:
        if self._refs[block] == 0:
            self._idle.pop(block, None)
        self._refs[block] += 1

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._idle.popitem(last=False)  # the least recently used cached prefix
            self._unindex(block)
            self.evictions += 1
        self._refs[block] = 1
        return block

    def _unindex(self, block: int) -> None:
        digest = self._digest_of.pop(block, None)
        if digest is not None:
            del self._block_of[digest]
        del self._tokens_of[block]
        parent = self._parent_of.pop(block)
        siblings = self._children[parent]
        del siblings[block]
        if not siblings:
            del self._children[parent]
