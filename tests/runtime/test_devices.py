"""Device names are checked against this machine, with errors that say what is available."""
import pytest
import torch

import misotts
from misotts.runtime.devices import available_devices, resolve_device


def test_known_devices_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert "cpu" in available_devices()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_cuda_says_so():
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=rf"'{name}' \(--device / device=\) is not available: .*available here: cpu$"):
            resolve_device(name)
    with pytest.raises(ValueError, match="is not available"):  # the API, before any work
        misotts.load("tiny", device="cuda")


def test_unknown_device_names_say_what_is_available():
    with pytest.raises(ValueError, match=r"unknown device 'gpu' .*use cpu, cuda or cuda:N; available here: cpu"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match=r"'meta' .*is not supported"):
        resolve_device("meta")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
