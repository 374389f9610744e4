"""A model too large for the device is refused before anything is allocated, with both numbers."""
import pytest
import torch

import misotts
from misotts.runtime.config import PRESETS
from misotts.weights import memory, random_model
from misotts.weights.memory import GIB, weight_bytes


@pytest.fixture
def one_gib_free(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: GIB)
    allocated = []
    real_empty = torch.empty

    def watch(*args, **kwargs):
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "meta":
            allocated.append(args)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", watch)
    return allocated


def test_weight_bytes_count_every_parameter():
    model = random_model(PRESETS["tiny"], dtype=torch.bfloat16)
    assert weight_bytes(PRESETS["tiny"], torch.bfloat16) == sum(p.nbytes for p in model.parameters())


def test_random_model_too_large_is_refused_first(one_gib_free):
    with pytest.raises(ValueError, match=r"csm-1b needs 5\.8 GiB for its weights in float32 but cpu has 1\.0 GiB "
                                         r"free: a 2-byte dtype halves it \(--dtype bf16 / dtype=torch\.bfloat16: 2\.9 GiB\)"):
        random_model(PRESETS["csm-1b"], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"needs 2\.9 GiB for its weights in bfloat16 .*smaller model"):
        misotts.load("csm-1b", device="cpu", dtype=torch.bfloat16, random_init=True, progress=False)
    assert not one_gib_free  # nothing was allocated on the way to the error


def test_a_model_that_fits_loads(one_gib_free):
    assert random_model(PRESETS["tiny"]) is not None and one_gib_free
