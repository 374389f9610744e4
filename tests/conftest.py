"""Shared test setup.

Without a GPU, Triton kernels run in its interpreter; TRITON_INTERPRET must be set before
anything imports triton (misotts.kernels.rng does, via the sampler), so it is set here, first.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from a second thread and lose much when the cores are shared
    (the engine and server tests use it for every test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
