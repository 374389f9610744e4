"""The transformers peer computes our model's math: same weights, same logits, same greedy codes."""
import pytest
import torch

import misotts
from misotts.bench.systems import to_transformers
from misotts.runtime.generate import generate_codes


@pytest.fixture(scope="module")
def pair():
    tts = misotts.load("tiny", device="cpu", random_init=True, seed=3)
    return tts, to_transformers(tts.model)


def test_weights_are_shared_not_copied(pair):
    tts, hf = pair
    m = tts.model
    assert hf.lm_head.weight.data_ptr() == m.codebook0_head.weight.data_ptr()
    assert hf.depth_decoder.model.embed_tokens.weight.data_ptr() == m.audio_embeddings.weight.data_ptr()
    assert hf.depth_decoder.codebooks_head.weight.data_ptr() == m.audio_head.data_ptr()


@torch.inference_mode()
def test_backbone_and_depth_logits_match(pair):
    tts, hf = pair
    m = tts.model
    context = [misotts.Segment(1, "Hi.", codes=torch.arange(64).view(2, 32))]
    rows, mask = tts.prompt("Same logits, please.", context=context)
    m.setup_caches(1, 64)
    h = m.backbone_forward(rows[None], mask[None], torch.arange(len(rows)))
    out = hf(inputs_embeds=m.embed_frames(rows[None], mask[None]), output_hidden_states=True)
    torch.testing.assert_close(out.logits, m.codebook0_head(h), rtol=1e-5, atol=1e-5)

    codes = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    hs = h[0, -2:]  # two hidden states as a batch of two
    ours = m.depth_logits(hs, codes)  # [2, 31, vocab] for codebooks 1..31
    theirs = hf.depth_decoder(input_ids=torch.nn.functional.pad(codes[:, :-1], (1, 0)),
                              backbone_last_hidden_state=hs).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("static", [False, True])
@torch.inference_mode()
def test_greedy_generate_equals_our_frames(pair, static):
    tts, hf = pair
    rows, mask = tts.prompt("Greedy frames.")
    extra = dict(cache_implementation="static", max_cache_len=256, depth_decoder_cache_implementation="static") \
        if static else {}
    theirs = hf.generate(inputs_embeds=tts.model.embed_frames(rows[None], mask[None]), max_new_tokens=4,
                         do_sample=False, depth_decoder_do_sample=False, **extra)
    assert torch.equal(theirs[0], generate_codes(tts.model, rows, mask, 4, temperature=0.0, topk=1))
