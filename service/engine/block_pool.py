"""The KV block pool: reference-counted blocks, and the prefix cache over them. Pure Python.

Every block is in exactly one of three states:

- free: reference count 0 and no cached content; allocations take these first;
- in use: reference count >= 1 (one per sequence whose block table holds it); a block shared by
  several sequences is only ever read by them (only full blocks are shared, and a sequence writes
  only past its full blocks);
- evictable: reference count 0 but its content is cached under its hash; it stays readable by a
  later request with the same prefix until an allocation finds no free block and evicts it, least
  recently released first.

A block's hash covers its tokens and the hash of the block before it (so a hash names the whole
prefix up to the block's end), seeded with what else determines the KV (the model's identity).
Hashes are 128-bit BLAKE2b digests: a false hit would need a collision of those.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

BlockHash = bytes


def hash_block(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    """The hash of a full block holding `tokens`, after the blocks whose hash is `parent`."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def root_hash(salt: str) -> BlockHash:
    """The `parent` of a sequence's first block: everything besides the tokens that changes the KV."""
    return hashlib.blake2b(salt.encode(), digest_size=16).digest()


class BlockPool:
    """`num_blocks` KV blocks with reference counts; with `enable_caching`, full blocks can be
    registered under their hash and found again by later sequences (see the module docstring)."""

    def __init__(self, num_blocks: int, enable_caching: bool = False) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; oldest release first
        self._cached: dict[BlockHash, int] = {}  # hash -> the block holding it (in use or evictable)
        self.num_evictions = 0

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks whose content is registered in the prefix cache (in use or evictable)."""
        return len(self._cached)

    def is_free(self, block: int) -> bool:
        """No sequence holds the block (it may still be cached)."""
        return self._ref[block] == 0

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def block_hash(self, block: int) -> BlockHash | None:
        return self._hash[block]

    def lookup(self, hashes: Iterable[BlockHash]) -> list[int]:
        """The blocks holding the longest cached run of `hashes` from the first one (nothing is taken)."""
        blocks: list[int] = []
        if not self.enable_caching:
            return blocks
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def num_evictable_in(self, blocks: Iterable[int]) -> int:
        """How many of `blocks` are evictable now (taking them shrinks `num_free` by that much)."""
        return sum(1 for b in blocks if self._ref[b] == 0)

    # ---- changes ---------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """n blocks nobody holds, reference count 1: free ones first, then the least recently released
        cached ones (their hashes are forgotten)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            raise RuntimeError(f"out of KV blocks: want {n}, {self.num_free} free")
        blocks: list[int] = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _none = self._evictable.popitem(last=False)
                self._forget(b)
                self.num_evictions += 1
            self._ref[b] = 1
            blocks.append(b)
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """Take a reference to cached blocks (found by `lookup`), reviving evictable ones."""
        for b in blocks:
            if self._hash[b] is None:
                raise ValueError(f"block {b} is not cached")
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block. A block nobody holds any more becomes evictable if it is
        cached, else free. Release a sequence's blocks last-first, so that its prefix outlives its tail."""
        blocks = list(blocks)
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"duplicate blocks in free(): {blocks}")
        for b in blocks:
            if not 0 <= b < self.num_blocks or self._ref[b] == 0:
                raise ValueError(f"block {b} is not allocated")
        for b in blocks:
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def register(self, block: int, h: BlockHash) -> bool:
        """Cache a full block in use under its hash. False (and nothing changes) when caching is off or
        another block already holds that content (two sequences computed the same prefix at once)."""
        if self._ref[block] == 0:
            raise ValueError(f"block {block} is not allocated")
        if not self.enable_caching or h in self._cached or self._hash[block] is not None:
            return False
        self._hash[block] = h
        self._cached[h] = block
        return True

    def reset(self) -> int:
        """Forget every cached block: evictable ones become free, ones in use stay with their holders but
        are never shared again. Returns how many blocks were forgotten."""
        n = len(self._cached)
        for b in list(self._cached.values()):
            self._forget(b)
        while self._evictable:
            b, _none = self._evictable.popitem(last=False)
            self._free.append(b)
        return n

    def _forget(self, block: int) -> None:
        h = self._hash[block]
        if h is not None:
            del self._cached[h]
            self._hash[block] = None
