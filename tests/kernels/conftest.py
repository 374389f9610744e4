"""Kernel tests run on the CPU through Triton's interpreter, in fp32.

TRITON_INTERPRET must be set before triton is imported (triton.jit reads it at decoration time);
tests/conftest.py sets it when there is no GPU.  On a GPU machine the rest of the suite needs
compiled Triton, so these CPU-tensor tests run in a process of their own there:
`TRITON_INTERPRET=1 python -m pytest tests/kernels` (the GPU suite does).
"""
import os

import pytest
import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    if INTERPRETED:
        return
    skip = pytest.mark.skip(reason="interpreter tests: run `TRITON_INTERPRET=1 python -m pytest tests/kernels`")
    for item in items:
        if "tests/kernels/" in str(item.fspath) and "cuda" not in item.keywords:
            item.add_marker(skip)

# k and v share one buffer [blocks, 2, page, Hkv, d], so caches are strided views, and the last
# blocks start past 2^31 elements: page ids * strides overflow int32 unless the kernel uses int64.
BIG_BLOCKS, BIG_PAGE, BIG_KV_HEADS, BIG_HEAD_DIM = 530_000, 16, 2, 64


@pytest.fixture(scope="session")
def big_kv_cache():
    """(k_cache, v_cache) views of an ~8.7 GB buffer that is never touched as a whole: the OS only
    commits the pages a test writes, so only the blocks a test fills cost memory."""
    kv = torch.empty(BIG_BLOCKS, 2, BIG_PAGE, BIG_KV_HEADS, BIG_HEAD_DIM)
    assert kv[-1].data_ptr() - kv.data_ptr() > 4 * 2**31  # byte offset past int32 elements
    return kv[:, 0], kv[:, 1]


def fill_blocks(cache, blocks, generator=None):
    """Random data in the given blocks only (the rest of a big cache stays untouched)."""
    for b in blocks:
        cache[b] = torch.randn(cache.shape[1:], generator=generator)


@pytest.fixture
def fill():
    return fill_blocks
