"""The backbone's paged KV cache: a fixed pool of blocks, reference counts, and prefix reuse.

Every backbone position (a prompt row or a generated frame) owns one slot; a block holds
`block_size` consecutive positions of one sequence.  A full block whose KV is written gets a
key: a hash chained over its rows and every row before it, so equal keys mean equal prefixes
and therefore equal KV.  Keyed blocks stay cached after their sequence ends and are handed to
a later sequence whose rows start the same way; unused keyed blocks are evicted least recently
used first when fresh blocks run out.  The pool itself is plain Python (the host side); the
KV tensors live on the device (see `PagedKV`).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from misotts.runtime.config import TransformerConfig


def block_keys(frames: torch.Tensor, mask: torch.Tensor, block_size: int, parent: bytes = b"") -> list[bytes]:
    """Chained keys of the full blocks of rows frames, mask [S, n + 1], continuing from `parent`."""
    keys = []
    rows = torch.cat([frames.long(), mask.long()], dim=1).cpu().numpy()
    for start in range(0, len(rows) - block_size + 1, block_size):
        parent = hashlib.blake2b(parent + rows[start:start + block_size].tobytes(), digest_size=16).digest()
        keys.append(parent)
    return keys


class PoolFull(RuntimeError):
    """Not enough free blocks right now (the caller may wait and retry)."""


class BlockPool:
    """Block ids 0..num_blocks-1; refcounted; keyed blocks are cached for reuse, evicted LRU."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.key_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.free = list(range(num_blocks - 1, -1, -1))  # never keyed, or evicted
        self.idle: OrderedDict[int, None] = OrderedDict()  # keyed, unused: reusable or evictable, oldest first
        self.reused_positions = 0  # prompt positions served from the cache
        self.computed_positions = 0  # prompt positions that had to be prefilled

    def available(self) -> int:
        return len(self.free) + len(self.idle)

    def all_free(self) -> bool:
        return not any(self.refs)

    def match(self, keys: list[bytes]) -> list[int]:
        """The cached blocks for the longest prefix of `keys` (not yet taken: see `take`)."""
        blocks = []
        for key in keys:
            if key not in self.block_of:
                break
            blocks.append(self.block_of[key])
        return blocks

    def allocate(self, cached: list[int], fresh: int) -> list[int]:
        """Take the `cached` blocks (from `match`) and `fresh` new ones, or raise PoolFull."""
        idle_cached = sum(1 for b in cached if self.refs[b] == 0)
        if self.available() - idle_cached < fresh:
            raise PoolFull(f"{fresh} blocks needed, {self.available() - idle_cached} available")
        for b in cached:
            self.idle.pop(b, None)
            self.refs[b] += 1
        new = []
        for _ in range(fresh):
            if self.free:
                b = self.free.pop()
            else:  # evict the least recently used cached block
                b, _ = self.idle.popitem(last=False)
                del self.block_of[self.key_of.pop(b)]
            self.refs[b] = 1
            new.append(b)
        return cached + new

    def release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):  # a sequence's tail becomes least recent: evicted before its head
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.key_of:
                    self.idle[b] = None  # most recently used: evicted last
                else:
                    self.free.append(b)

    def register(self, block: int, key: bytes) -> None:
        """Mark a full, written block as holding the prefix `key` (first writer wins)."""
        if key not in self.block_of and block not in self.key_of:
            self.block_of[key] = block
            self.key_of[block] = key

    def clear_cache(self) -> None:
        """Forget every cached prefix (blocks in use stay in use)."""
        for b in list(self.idle):
            self.free.append(b)
        self.idle.clear()
        self.block_of.clear()
        self.key_of.clear()


class PagedKV:
    """Per-layer K and V, [num_blocks + 1, block_size, kv_heads, head_dim] each.

    The extra last block is a scratch block no sequence owns: padding lanes of a batch write
    their (ignored) KV there, so a step never needs a data-dependent "skip" branch.
    """

    def __init__(self, cfg: TransformerConfig, num_blocks: int, block_size: int, dtype, device):
        shape = (cfg.n_layers, 2, num_blocks + 1, block_size, cfg.n_kv_heads, cfg.head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        self.scratch_block = num_blocks

    def layer(self, i: int):
        return self.kv[i, 0], self.kv[i, 1]

    @staticmethod
    def block_bytes(cfg: TransformerConfig, block_size: int, dtype) -> int:
        return 2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()
