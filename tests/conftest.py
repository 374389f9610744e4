"""Shared test setup.

Without a GPU, Triton kernels run in its interpreter; TRITON_INTERPRET must be set before
anything imports triton (misotts.kernels.rng does, via the sampler), so it is set here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
