"""Which KV-cache blocks are free, whose they are, and which hold a reusable prompt prefix.

The KV memory (paged.py) is a fixed pool of blocks of `block_size` token slots. A request
reserves, when it is admitted, every block its prompt plus its `max_new_tokens` can need, so a
running request can never run out of memory half-way; a request that does not fit waits in the
queue. Block 0 is never handed out: it stays zero and is where padding points.

Prefix reuse: a full block whose tokens were computed is indexed by a digest of every token from
the start of the sequence up to its end (a chain: the previous block's digest plus this block's
tokens), so a later prompt that begins with the same tokens finds those blocks and skips their
prefill. Only full blocks are shared and they are never written again, so sharing needs no copy.
A block stays indexed after its request ends, holding no reference, in least-recently-used
order; it is evicted (unindexed and reused) only when a reservation needs the space. The digest
is cryptographic: a prompt crafted to collide with another user's prefix would read their KV.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

NULL_BLOCK = 0


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
        self._digest_of: dict[int, bytes] = {}  # indexed block -> its digest
        self._block_of: dict[bytes, int] = {}  # digest -> indexed block
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
        return len(self._block_of)

    # ----------------------------------------------------------------- reserve and release

    def reserve(self, prompt: Sequence[int], total_tokens: int, *, reuse: bool = True) -> tuple[list[int], int] | None:
        """Blocks for a request of `total_tokens` (prompt plus its token budget) whose prompt is
        `prompt`, reusing a cached prefix unless `reuse` is false: (block table, tokens already
        computed), or None when it does not fit now. At least one prompt token is always left to
        compute (its logits give the first answer token)."""
        shared = self._match(prompt) if reuse else []
        for block in shared:
            self._ref(block)
        needed = blocks_for(total_tokens, self.block_size) - len(shared)
        if needed > self.available:
            self.release(shared)
            return None
        table = shared + [self._take() for _ in range(needed)]
        self.peak_used = max(self.peak_used, self.used)
        cached_tokens = len(shared) * self.block_size
        self.hit_tokens += cached_tokens
        if reuse:
            self.query_tokens += len(prompt)
        return table, cached_tokens

    def release(self, table: Sequence[int]) -> None:
        """Drop one reference to each block; an unreferenced block is freed, or kept as a cached
        prefix (evictable) when it is indexed."""
        for block in table:
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._digest_of:
                self._idle[block] = None
            else:
                self._free.append(block)

    def index(self, table: Sequence[int], tokens: Sequence[int], computed: int, digests: list[bytes]) -> None:
        """Make the full blocks among the first `computed` tokens findable by later prompts.

        `digests` is the caller's chain so far (extended here), so indexing a running sequence
        again after more tokens costs only the new blocks.
        """
        if not self.prefix_caching:
            return
        size = self.block_size
        for i in range(len(digests), computed // size):
            parent = digests[-1] if digests else b""
            digest = chain_digest(parent, tokens[i * size : (i + 1) * size])
            digests.append(digest)
            block = table[i]
            if digest not in self._block_of and block not in self._digest_of:
                self._block_of[digest] = block
                self._digest_of[block] = digest

    # ----------------------------------------------------------------- internals

    def _match(self, prompt: Sequence[int]) -> list[int]:
        if not self.prefix_caching:
            return []
        size, found, parent = self.block_size, [], b""
        for i in range((len(prompt) - 1) // size):
            parent = chain_digest(parent, prompt[i * size : (i + 1) * size])
            block = self._block_of.get(parent)
            if block is None:
                break
            found.append(block)
        return found

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
        digest = self._digest_of.pop(block)
        del self._block_of[digest]
