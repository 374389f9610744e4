"""random_model: seeded, reproducible, the requested dtype, and usable."""
import dataclasses

import torch

from misotts.runtime.config import PRESETS
from misotts.runtime.generate import generate_codes
from misotts.runtime.prompt import text_rows
from misotts.weights import random_model

TINY = PRESETS["tiny"]


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (random_model(TINY, seed=s).state_dict() for s in (0, 0, 1))
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert name.endswith("norm.weight") == torch.equal(a[name], c[name]), name


def test_distribution_and_norms():
    sd = random_model(dataclasses.replace(TINY, text_vocab_size=4096), seed=3).state_dict()
    for name, t in sd.items():
        assert t.dtype == torch.float32 and t.device.type == "cpu"
        if name.endswith("norm.weight"):
            assert torch.equal(t, torch.ones_like(t)), name
    emb = sd["text_embeddings.weight"]  # 262k draws
    assert abs(emb.mean().item()) < 1e-3 and abs(emb.std().item() - 0.02) < 1e-3
    assert abs(sd["audio_head"].std().item() - 0.02) < 1e-3


def test_bfloat16_is_drawn_in_bfloat16_and_reproducible():
    a = random_model(TINY, seed=5, dtype=torch.bfloat16)
    b = random_model(TINY, seed=5, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_random_model_generates_deterministically():
    model = random_model(TINY, seed=0)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    frames, mask = text_rows([TINY.bos_id, 72, 105, TINY.eos_id])
    a = generate_codes(model, frames, mask, 3, temperature=0, topk=1, stop_on_eos=False)
    b = generate_codes(random_model(TINY, seed=0), frames, mask, 3, temperature=0, topk=1, stop_on_eos=False)
    assert a.shape == (3, 32) and torch.equal(a, b)
