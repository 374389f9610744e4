"""The engine computes the reference model's codes: same greedy codes, same sampled codes per seed."""
import pytest
import torch

from misotts.kernels.reference import sample_topk_ref
from misotts.kernels.rng import uniform
from misotts.runtime.config import ModelConfig
from misotts.engine import Engine, EngineConfig
from misotts.runtime.generate import generate_codes
from misotts.weights.formats import config_from_hf

from ..weights.hf_models import HF_SHAPES  # the shapes checked against transformers
from .conftest import generate, history, make_model, prompt, submit


def hf_config(name) -> ModelConfig:
    backbone, decoder = HF_SHAPES[name]
    return config_from_hf({**backbone, "depth_decoder_config": decoder, "text_vocab_size": 261,
                           "vocab_size": 2051, "num_codebooks": 32, "bos_token_id": 256})


SETTINGS = [dict(temperature=0.0, topk=50, seed=0), dict(temperature=0.9, topk=50, seed=7)]


def assert_engine_equals_reference(model, frames, mask, max_frames, **engine_config):
    engine = Engine(model, EngineConfig(max_batch=4, **engine_config))
    try:
        for kw in SETTINGS:
            ref = generate_codes(model, frames, mask, max_frames, stop_on_eos=False, **kw)
            out = generate(engine, frames, mask, max_frames, stop_on_eos=False, **kw)
            assert torch.equal(out, ref), f"{kw}: {(out != ref).any(1).nonzero()[:1].tolist()} first differing frame"
    finally:
        engine.close()


@pytest.mark.parametrize("std", [0.02, 0.1])
def test_tiny_codes_equal_reference(std):
    # A prompt with audio context spans several blocks; a 16-position prefill chunk splits it.
    frames, mask = prompt("And what did you think of it?", 1, history(2))
    assert_engine_equals_reference(make_model(std=std), frames, mask, 12, prefill_chunk=16)


@pytest.mark.parametrize("name", sorted(HF_SHAPES))
def test_transformers_parity_shapes_equal_reference(name):
    frames, mask = prompt("hello world, this is a test")
    assert_engine_equals_reference(make_model(hf_config(name), std=0.05), frames, mask, 6)


def test_one_row_prompt_and_end_of_speech():
    model = make_model()
    frames, mask = prompt()
    frames, mask = frames[:1], mask[:1]  # nothing to prefill: the first frame runs the only row
    assert_engine_equals_reference(model, frames, mask, 4)
    # Heads of zeros: every logit ties, the greedy code is 0 everywhere, the first frame is end of speech.
    model.codebook0_head.weight.zero_()
    model.audio_head.zero_()
    engine = Engine(model, EngineConfig(max_batch=2))
    stream = submit(engine, frames, mask, 4, temperature=0.0)
    assert stream.codes().shape == (0, 32) and stream.stats.finish == "eos"
    assert len(generate_codes(model, frames, mask, 4, temperature=0.0)) == 0
    engine.close()


def test_per_lane_sampler_equals_reference_sampler():
    torch.manual_seed(0)
    logits = torch.randn(6, 2051) * 3
    logits[2, :10] = logits[2].max() + 1  # ties at the top
    settings = [(0.9, 50), (0.0, 50), (1.3, 1), (0.7, 2051), (0.5, 10), (1.0, 3)]
    temperature = torch.tensor([t for t, _ in settings])
    topk = torch.tensor([k for _, k in settings])
    seed, counter = torch.arange(6) * 1000 + 5, torch.arange(6) * 32 + 3
    got = sample_topk_ref(logits, temperature, topk, seed, counter, torch.arange(2051))  # per-lane tensors
    for b, (t, k) in enumerate(settings):
        assert got[b] == sample_topk_ref(logits[b:b + 1], t, k, seed[b:b + 1], counter[b:b + 1])[0]
    # The engine draws a frame's noise for all codebooks at once ([N, 32, V]); row i must be
    # what the reference draws for codebook i.
    frame_noise = uniform(seed[:, None], counter[:, None] + torch.arange(32), torch.arange(2051))
    for i in (0, 5, 31):
        assert torch.equal(frame_noise[:, i], uniform(seed, counter + i, 2051))


@pytest.mark.slow
def test_triton_ops_in_the_interpreter_equal_reference():
    """The Triton op set (rvq_embed, rope_kv_write, paged prefill/decode, rmsnorm, swiglu) run by
    Triton's CPU interpreter gives the reference codes: checks the engine's calls to the kernels."""
    frames, mask = prompt("Hi!", 0, history(1, frames=10))  # 28 rows: a two-block prefill
    model = make_model()
    engine = Engine(model, EngineConfig(max_batch=1, ops="triton", pipelined=False))
    kw = SETTINGS[1]
    ref = generate_codes(model, frames, mask, 2, stop_on_eos=False, **kw)
    assert torch.equal(generate(engine, frames, mask, 2, stop_on_eos=False, **kw), ref)
    engine.close()


@pytest.mark.slow
def test_triton_ops_with_requests_joining_and_leaving_equal_reference(monkeypatch):
    """The fused depth loop (norm_linear, depth_attention, sample_next_input) in a batch that
    changes: three requests on two lanes, so the third joins mid-way when the shorter leaves;
    greedy and sampled lanes side by side, each with the reference path's codes."""
    import threading

    from .conftest import frames_wait_for

    model = make_model()
    reqs = [dict(frames=f, mask=m, max_frames=n, stop_on_eos=False, temperature=t, topk=50, seed=s)
            for (f, m), n, t, s in ((prompt("Hi!"), 3, 0.9, 7), (prompt("Yo", 1), 1, 0.0, 0),
                                    (prompt("Ok.", 0), 2, 0.9, 3))]
    want = [generate_codes(model, **r) for r in reqs]
    engine = Engine(model, EngineConfig(max_batch=2, ops="triton", wait_timeout_s=3600.0, pipelined=False))  # interpreted: slow frames (the loop order is tested with the torch ops)
    submitted, results = [], [None] * len(reqs)
    frames_wait_for(monkeypatch, engine, submitted, len(reqs), timeout=600.0)  # frame 2 waits for all three

    def run(i):
        stream = submit(engine, **reqs[i])
        submitted.append(i)
        results[i] = stream.codes()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    try:
        for t in threads:
            t.start()
            t.join(0.05)
        for t in threads:
            t.join(1200)
        for i, (got, ref) in enumerate(zip(results, want)):
            assert got is not None and torch.equal(got, ref), f"request {i}"
        assert engine.frames_run < sum(len(w) for w in want)  # frames were shared
    finally:
        engine.close()
