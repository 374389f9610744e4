"""Checkpoints saved by transformers load into our model and reproduce transformers' CSM math.

Logits (fp32) must agree to |ours - transformers| <= 1e-5 * max|transformers logits|.  Both sides
do the same fp32 operations in a different order (SDPA with a boolean mask vs transformers'
attention, RoPE frequencies from float64 vs float32, the 33 embedding columns summed in another
order, einsum vs per-codebook linear), each off by a few ulps (fp32 epsilon 1.2e-7); measured on
these models the gap is <= 5e-7 of the logit scale, so 1e-5 leaves a 20x margin.  It must stay
tight: the subtlest mistake tried, dropping the Llama-3 RoPE scaling (which only moves the low
frequencies, barely felt over 40 positions), shifts logits by 1e-4 of their scale; a wrong norm
eps by 7e-3, one layer's q/k in the wrong RoPE layout by 2e-2.  Greedy codes must match exactly.
"""
import pytest
import torch

import misotts
from misotts.runtime.audio import FRAME_MS
from misotts.runtime.generate import generate_codes
from misotts.runtime.prompt import Segment, build_prompt
from misotts.runtime.tokenizer import ByteTokenizer
from misotts.weights import detect_format, load_model

from ..tokenizer_files import write_templated_tokenizer
from .hf_models import AUDIO_EOS_TOKEN, AUDIO_TOKEN, BOS, EOS

FRAMES = 20
REL_TOL = 1e-5
tok = ByteTokenizer(BOS, EOS)


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor):
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= REL_TOL * scale, f"max |diff| {err:.3g} > {REL_TOL:g} * logit scale {scale:.3g}"


def audio_context(hf, n_frames: int = 6, seed: int = 0):
    """A context turn with audio, as transformers' own inputs and as our Segment with the codes
    that transformers' codec makes of that audio."""
    g = torch.Generator().manual_seed(seed)
    audio = 0.1 * torch.randn(1920 * n_frames, generator=g)
    with torch.no_grad():
        codes = hf.codec_model.encode(audio[None, None]).audio_codes[0].T  # [frames, 32]
    context, target = (0, "hi there"), (1, "how are you?")
    ids = tok.encode(f"[{context[0]}]{context[1]}") + [AUDIO_TOKEN] * len(codes) + [AUDIO_EOS_TOKEN]
    ids += tok.encode(f"[{target[0]}]{target[1]}")
    hf_inputs = dict(input_ids=torch.tensor([ids]), input_values=audio[None, None],
                     input_values_cutoffs=torch.tensor([[audio.numel()]]))
    frames, mask = build_prompt(target[1], target[0], [Segment(*context, codes=codes)], tok)
    return hf_inputs, frames, mask


def text_only():
    ids = tok.encode("[0]hello world, this is a test")
    frames, mask = build_prompt("hello world, this is a test", 0, [], tok)
    return dict(input_ids=torch.tensor([ids])), frames, mask


def our_backbone_logits(model, frames, mask):
    model.setup_caches(1, frames.shape[0])
    h = model.backbone_forward(frames[None], mask[None], torch.arange(frames.shape[0]))
    return model.codebook0_head(h)


def hf_greedy(hf, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = hf.generate(**inputs, do_sample=False, depth_decoder_do_sample=False, max_new_tokens=FRAMES)
    assert out.shape == (1, FRAMES, 32), f"transformers stopped early: {tuple(out.shape)}"
    return out[0]


def test_backbone_and_depth_logits(hf_checkpoint):
    path, hf = hf_checkpoint
    assert detect_format(path) == "hf"
    model, config, _ = load_model(path, progress=False)
    assert config.backbone.head_dim == hf.config.head_dim
    for inputs, frames, mask in (text_only(), audio_context(hf)):
        with torch.no_grad():
            ref = hf(**inputs, output_hidden_states=True)
            ours = our_backbone_logits(model, frames, mask)
        assert_logits_close(ours, ref.logits)

        # Depth decoder, teacher-forced on random codes: transformers puts h at position 0 and
        # codebook i - 1 at position i (its input_ids[:, 0] is a placeholder).
        h_last = ref.hidden_states[-1][:, -1]
        codes = torch.randint(0, 2048, (3, 32), generator=torch.Generator().manual_seed(1))
        h3 = h_last.expand(3, -1).contiguous()
        with torch.no_grad():
            hf_depth = hf.depth_decoder(input_ids=torch.cat([torch.zeros_like(codes[:, :1]), codes[:, :-1]], 1),
                                        backbone_last_hidden_state=h3).logits
            ours_depth = model.depth_logits(h3, codes)
        assert ours_depth.shape == hf_depth.shape == (3, 31, 2051)
        assert_logits_close(ours_depth, hf_depth)


def test_greedy_codes_text_only(hf_checkpoint):
    path, hf = hf_checkpoint
    model, _, _ = load_model(path, progress=False)
    inputs, frames, mask = text_only()
    ours = generate_codes(model, frames, mask, FRAMES, temperature=0, topk=1, stop_on_eos=False)
    assert torch.equal(ours, hf_greedy(hf, inputs))


def test_greedy_codes_with_audio_context(hf_checkpoint):
    path, hf = hf_checkpoint
    model, _, _ = load_model(path, progress=False)
    inputs, frames, mask = audio_context(hf)
    ours = generate_codes(model, frames, mask, FRAMES, temperature=0, topk=1, stop_on_eos=False)
    assert torch.equal(ours, hf_greedy(hf, inputs))


@pytest.mark.parametrize("hf_checkpoint", ["gqa2-hd64"], indirect=True)  # the prompt, not the shape, is tested
def test_greedy_codes_with_the_tokenizers_own_bos_eos(hf_checkpoint, tmp_path):
    """A tokenizer.json wrapping texts in 250 ... 251, not the config's BOS 256 and Llama 3's EOS
    128001 (outside this 261-id vocabulary): transformers encodes with the file's template, and
    both our backends must too."""
    from transformers import PreTrainedTokenizerFast

    path, hf = hf_checkpoint
    tokenizer = write_templated_tokenizer(tmp_path / "tokenizer.json", bos=250, eos=251)
    ids = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer))("[0]hello world")["input_ids"]
    assert ids == [250, 1, 2, 251]
    want = hf_greedy(hf, dict(input_ids=torch.tensor([ids])))
    for backend in ("reference", "auto"):
        tts = misotts.load(path, device="cpu", dtype=torch.float32, tokenizer=tokenizer, progress=False,
                           backend=backend, engine={"max_batch": 1})
        got = tts.generate_codes("hello world", temperature=0, topk=1, stop_on_eos=False, max_audio_ms=FRAMES * FRAME_MS)
        if tts.engine is not None:
            tts.engine.close()
        assert torch.equal(got, want), backend


@pytest.mark.parametrize("hf_checkpoint", ["gqa2-hd64"], indirect=True)  # the codec, not the shape, is tested
def test_the_bundled_mimi_is_the_codec(hf_checkpoint, small_hf_dir, tmp_path):
    """A transformers checkpoint's own codec_model.* decodes; kyutai's Mimi is only the fallback.
    (tests/runtime/test_mimi_names.py checks the name map on weights whose audio depends on the codes.)"""
    path, hf = hf_checkpoint
    tokenizer = write_templated_tokenizer(tmp_path / "tokenizer.json", bos=BOS, eos=EOS)
    tts = misotts.load(path, device="cpu", dtype=torch.float32, progress=False, backend="reference", tokenizer=tokenizer)
    assert tts.codec_source == str(path)
    codes = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf.codec_model.decode(codes.T[None]).audio_values[0, 0]
    torch.testing.assert_close(tts.codec.decode(codes), want, rtol=0, atol=1e-5)
    without = misotts.load(small_hf_dir, device="cpu", dtype=torch.float32, progress=False, backend="reference",
                           tokenizer=tokenizer)
    assert without.codec_source == "kyutai/moshiko-pytorch-bf16"
