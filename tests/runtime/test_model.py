"""The reference model's own invariants (transformers parity lives in tests/weights)."""
import pytest
import torch

from misotts.runtime.config import PRESETS, ModelConfig, TransformerConfig
from misotts.runtime.generate import check_context_window, generate_codes
from misotts.runtime.model import CSMModel, rope_inv_freq
from misotts.runtime.prompt import text_rows

CFG = PRESETS["tiny"]


def make_model(cfg: ModelConfig = CFG, seed: int = 0) -> CSMModel:
    torch.manual_seed(seed)
    model = CSMModel(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)  # norms too, so a wrong norm weight shows
    return model.eval()


def prompt(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return text_rows(torch.randint(0, CFG.text_vocab_size, (n,), generator=g).tolist(), CFG.num_codebooks)


def test_rope_frequencies_match_transformers_llama3():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = PRESETS["csm-1b"].backbone
    hf = LlamaConfig(hidden_size=cfg.dim, num_attention_heads=cfg.n_heads, head_dim=cfg.head_dim,
                     max_position_embeddings=131072,
                     rope_parameters={"rope_type": "llama3", "rope_theta": cfg.rope_base, "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    torch.testing.assert_close(rope_inv_freq(cfg), expected.float(), rtol=1e-6, atol=0)


@torch.inference_mode()
def test_chunked_prefill_equals_one_pass():
    model = make_model()
    frames, mask = prompt(20)
    model.setup_caches(1, 64)
    whole = model.backbone_forward(frames[None], mask[None], torch.arange(20))
    model.setup_caches(1, 64)
    first = model.backbone_forward(frames[None, :13], mask[None, :13], torch.arange(13))
    rest = model.backbone_forward(frames[None, 13:], mask[None, 13:], torch.arange(13, 20))
    # fp32, a different reduction order inside attention: differences ~1e-7 relative.
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_greedy_frame_equals_argmax_chain_of_teacher_forced_logits():
    model = make_model()
    frames, mask = prompt()
    model.setup_caches(1, 64)
    zero = torch.zeros(1, dtype=torch.long)
    codes = model.generate_frame(frames[None], mask[None], torch.arange(len(frames)), 0.0, 1, zero, zero)
    model.setup_caches(1, 64)
    h = model.backbone_forward(frames[None], mask[None], torch.arange(len(frames)))[:, -1]
    assert codes[0, 0] == model.codebook0_head(h).argmax(-1)[0]
    logits = model.depth_logits(h, codes)  # [1, 31, vocab]
    assert torch.equal(logits.argmax(-1)[0], codes[0, 1:])


@torch.inference_mode()
def test_embedding_is_the_masked_sum_of_rows():
    model = make_model()
    frames = torch.randint(0, 2048, (1, 3, 33))
    frames[..., 32] %= CFG.text_vocab_size
    mask = torch.rand(1, 3, 33) > 0.5
    got = model.embed_frames(frames, mask)
    want = torch.zeros(1, 3, CFG.backbone.dim)
    for s in range(3):
        for k in range(33):
            if mask[0, s, k]:
                table = model.text_embeddings.weight if k == 32 else model.audio_embeddings.weight
                want[0, s] += table[frames[0, s, k] + (0 if k == 32 else k * 2051)]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@torch.inference_mode()
def test_all_zero_frame_ends_generation():
    model = make_model()
    model.codebook0_head.weight.zero_()  # all logits equal: greedy picks code 0
    model.audio_head.zero_()
    frames, mask = prompt()
    assert generate_codes(model, frames, mask, 5, temperature=0, topk=1).shape == (0, 32)
    kept = generate_codes(model, frames, mask, 5, temperature=0, topk=1, stop_on_eos=False)
    assert kept.shape == (5, 32) and not kept.any()


@torch.inference_mode()
def test_sampled_generation_is_reproducible_per_seed():
    model = make_model()
    frames, mask = prompt()
    a = generate_codes(model, frames, mask, 4, temperature=0.9, topk=50, seed=7)
    b = generate_codes(model, frames, mask, 4, temperature=0.9, topk=50, seed=7)
    c = generate_codes(model, frames, mask, 4, temperature=0.9, topk=50, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_context_window_error_says_what_fits():
    with pytest.raises(ValueError, match="exceeds the model's context window of 2048"):
        check_context_window(2000, 100, 2048)
    check_context_window(1948, 100, 2048)


def test_meta_device_construction_allocates_nothing():
    with torch.device("meta"):
        model = CSMModel(PRESETS["miso-8b"])
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PRESETS["miso-8b"].num_parameters()


def test_bad_transformer_shapes_rejected():
    with pytest.raises(ValueError, match="multiple"):
        TransformerConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=3, ffn_dim=8)
