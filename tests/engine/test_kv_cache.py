"""The block pool: reference counts, prefix keys, LRU eviction."""
import pytest

from misotts.engine.kv_cache import BlockPool, PoolFull, block_keys

from .conftest import prompt


def test_keys_chain_over_whole_prefixes():
    frames, mask = prompt("a prompt long enough for a few blocks of rows")
    keys = block_keys(frames, mask, 8)
    assert len(keys) == len(frames) // 8 and len(set(keys)) == len(keys)
    assert block_keys(frames[:16], mask[:16], 8) == keys[:2]  # a prefix has the prefix's keys
    assert block_keys(frames[8:16], mask[8:16], 8, parent=keys[0]) == keys[1:2]  # continued from a parent
    other = frames.clone()
    other[3, -1] += 1  # one token differs in block 0: every later key differs
    assert not set(block_keys(other, mask, 8)) & set(keys)


def test_refcounts_sharing_and_release():
    pool = BlockPool(4, 16)
    a = pool.allocate([], 2)
    pool.register(a[0], b"k0")
    b = pool.allocate(pool.match([b"k0", b"k1"]), 1)  # shares a's first block
    assert b[0] == a[0] and pool.refs[a[0]] == 2 and pool.available() == 1
    with pytest.raises(PoolFull):
        pool.allocate([], 2)
    pool.release(a)
    assert pool.refs[a[0]] == 1 and not pool.all_free()
    pool.release(b)
    assert pool.all_free() and pool.available() == 4
    assert pool.match([b"k0"]) == [a[0]]  # still cached after its users are gone


def test_lru_eviction_keeps_recent_prefixes():
    pool = BlockPool(3, 16)
    for key in (b"old", b"mid", b"new"):
        blocks = pool.allocate([], 1)
        pool.register(blocks[0], key)
        pool.release(blocks)
    pool.release(pool.allocate(pool.match([b"old"]), 0))  # touching "old" makes it recent
    pool.allocate([], 1)  # evicts the least recently used: "mid"
    assert pool.match([b"mid"]) == [] and pool.match([b"old"]) and pool.match([b"new"])
    pool.allocate(pool.match([b"new"]), 1)  # takes "new" itself, evicts "old" for the fresh block
    assert pool.match([b"old"]) == [] and pool.available() == 0
    with pytest.raises(PoolFull):  # a block in use is never evicted
        pool.allocate([], 1)


def test_first_writer_keeps_the_key():
    pool = BlockPool(2, 16)
    a, b = pool.allocate([], 1), pool.allocate([], 1)
    pool.register(a[0], b"same")
    pool.register(b[0], b"same")  # computed twice concurrently: the duplicate stays private
    pool.release(b)
    assert pool.match([b"same"]) == a and b[0] in pool.free
