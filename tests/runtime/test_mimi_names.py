"""The Mimi bundled in a transformers CSM checkpoint (transformers' MimiModel names) loads into
moshi's Mimi and computes what transformers' MimiModel computes.

Random weights at a scale that keeps the signal alive through every layer (transformers' own
init, like moshi's, decodes every code sequence to nearly the same waveform, which would let a
wrong map pass).  Codes from encode must be identical; decoded audio (RMS ~0.14) must agree to
1e-5: both run the same fp32 maths in another order, 7e-7 apart measured, while a q/k left in
transformers' RoPE layout is off by 4e-3 and changes 20% of the codes.
"""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from misotts.runtime.codec import load_codec
from misotts.runtime.mimi_names import moshi_state_dict

AUDIO_TOL = 1e-5


@pytest.fixture(scope="module")
def hf_mimi():
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(0)
    model = MimiModel(MimiConfig()).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1 / math.sqrt(p[0].numel()), generator=g)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.01, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("embed_sum"):
                b.normal_(0.0, 0.2, generator=g)
    return model


@pytest.fixture(scope="module")
def saved_mimi(hf_mimi, tmp_path_factory):
    """The Mimi as save_pretrained writes it (the files' flat names, as kyutai/mimi on the hub)."""
    path = tmp_path_factory.mktemp("mimi")
    hf_mimi.save_pretrained(path)
    return path / "model.safetensors"


@pytest.fixture(scope="module")
def bundled_dir(saved_mimi, tmp_path_factory):
    """A folder holding the Mimi as a transformers CSM checkpoint bundles it (codec_model.*)."""
    path = tmp_path_factory.mktemp("bundled")
    save_file({f"codec_model.{k}": v for k, v in load_file(saved_mimi).items()}, path / "model.safetensors")
    return path


def test_bundled_codec_encodes_and_decodes_as_transformers_does(hf_mimi, bundled_dir):
    codec = load_codec(bundled_dir)
    g = torch.Generator().manual_seed(1)
    wav = 0.1 * torch.randn(4 * 1920, generator=g)
    with torch.no_grad():
        want_codes = hf_mimi.encode(wav[None, None]).audio_codes[0].T
    assert torch.equal(codec.encode(wav), want_codes)
    codes = torch.randint(0, 2048, (4, 32), generator=g)
    with torch.no_grad():
        want = hf_mimi.decode(codes.T[None]).audio_values[0, 0]
    assert want.pow(2).mean().sqrt() > 0.05  # the comparison means something
    torch.testing.assert_close(codec.decode(codes), want, rtol=0, atol=AUDIO_TOL)


def test_a_mimi_file_and_in_memory_names_load_too(hf_mimi, bundled_dir, saved_mimi):
    from moshi.models import loaders

    from_dir = load_codec(bundled_dir).mimi.state_dict()
    from_file = load_codec(saved_mimi).mimi.state_dict()  # no codec_model. prefix
    # transformers 5's nested in-memory names map to the same tensors
    from_memory = moshi_state_dict(hf_mimi.state_dict(), loaders.get_mimi(None, num_codebooks=32).state_dict(), 8, "x")
    for k in from_dir:
        assert torch.equal(from_dir[k], from_file[k]) and torch.equal(from_dir[k], from_memory[k]), k


def test_unknown_and_missing_tensors_are_named(hf_mimi):
    from moshi.models import loaders

    keys = loaders.get_mimi(None, num_codebooks=32).state_dict().keys()
    tensors = dict(hf_mimi.state_dict())
    tensors["encoder.extra.weight"] = torch.zeros(1)
    del tensors["decoder.decoder_seanet.layers.14.conv.bias"]
    with pytest.raises(ValueError, match=r"in x.*unknown tensors encoder\.extra\.weight.*missing 1 tensors, e\.g\. decoder\.model\.14\.conv\.conv\.bias"):
        moshi_state_dict(tensors, keys, 8, "in x")
