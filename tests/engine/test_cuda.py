"""The engine on CUDA (run by the GPU suite; skipped without a GPU).

What the CPU tests cannot show: captured frames replay like eager ones in every batch bucket, the
Triton op set gives the reference path's codes in fp32 at a real model's shapes, the engine's device
work runs on its own stream, and batched Mimi decode (captured per bucket) gives every stream its solo
audio.  fp32 throughout: Triton's fp32 dots are IEEE here (no TF32), so codes must match exactly.
"""
import threading

import pytest
import torch

from misotts.engine import Engine, EngineConfig
from misotts.runtime.config import PRESETS
from misotts.runtime.generate import generate_codes

from .conftest import generate, make_model, prompt, submit

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def tiny_cuda():
    return make_model().cuda()


def test_graph_replay_equals_eager_in_every_bucket(tiny_cuda):
    graphed = Engine(tiny_cuda, EngineConfig(max_batch=8, num_blocks=128))
    eager = Engine(tiny_cuda, EngineConfig(max_batch=8, num_blocks=128, cuda_graphs=False))
    assert graphed.graphs.buckets == [1, 2, 4, 8] and not eager.graphs.graphs
    assert sorted(graphed.graphs.graphs) == [(b, backbone) for b in (1, 2, 4, 8) for backbone in (False, True)]
    frames, mask = prompt()
    for count in (1, 2, 3, 5, 8):  # buckets 1, 2, 4, 8, 8
        for kw in (dict(temperature=0.0), dict(temperature=0.9, topk=50)):
            streams = [submit(graphed, frames, mask, 12, stop_on_eos=False, seed=s, **kw) for s in range(count)]
            want = [generate(eager, frames, mask, 12, stop_on_eos=False, seed=s, **kw) for s in range(count)]
            assert all(torch.equal(s.codes(), w) for s, w in zip(streams, want)), (count, kw)
    graphed.close()
    eager.close()


def test_cuda_graphs_survive_many_replays(tiny_cuda):
    engine = Engine(tiny_cuda, EngineConfig(max_batch=2))  # the pool from free GPU memory: close() gives it back
    frames, mask = prompt()
    first = generate(engine, frames, mask, 200, temperature=0.9, seed=1, stop_on_eos=False)
    for _ in range(3):
        assert torch.equal(generate(engine, frames, mask, 200, temperature=0.9, seed=1, stop_on_eos=False), first)
    assert engine.frames_run >= 800 and engine.wait_idle() and engine.pool.all_free()
    engine.close()


@pytest.mark.parametrize("preset", ["tiny", "csm-1b"])
def test_engine_equals_reference_in_fp32(preset, tiny_cuda):
    """Greedy and sampled, with a second request joining mid-way: the reference path's codes."""
    model = tiny_cuda if preset == "tiny" else make_model(PRESETS[preset], std=0.02).cuda()
    engine = Engine(model, EngineConfig(max_batch=4, num_blocks=64))
    frames, mask = prompt()
    late, late_mask = prompt("a second request, joining later")
    for kw in (dict(temperature=0.0), dict(temperature=0.9, topk=50, seed=3)):
        first = iter(submit(engine, frames, mask, 8, stop_on_eos=False, **kw))
        got_first = [next(first).codes]  # the second request joins once the first has a frame
        second = submit(engine, late, late_mask, 6, stop_on_eos=False, **kw)
        got_first += [frame.codes for frame in first]
        for got, (f, m, n) in ((torch.stack(got_first), (frames, mask, 8)), (second.codes(), (late, late_mask, 6))):
            want = generate_codes(model, f, m, n, stop_on_eos=False, **kw).cpu()
            assert torch.equal(got, want), (preset, kw)
    engine.close()


def test_engine_runs_on_its_own_stream_and_device(tiny_cuda):
    """Triton launches on the current device and stream: the engine thread makes its own current."""
    engine = Engine(tiny_cuda, EngineConfig(max_batch=2, num_blocks=32))
    seen, prefill = [], engine.runner.prefill_many

    def recording_prefill(*args):
        seen.append((torch.cuda.current_device(), torch.cuda.current_stream(), threading.current_thread().name))
        return prefill(*args)

    engine.runner.prefill_many = recording_prefill
    generate(engine, *prompt(), 2, stop_on_eos=False)
    assert seen and all(s == (tiny_cuda.audio_head.device.index, engine.stream, "misotts-engine") for s in seen)
    assert engine.stream != torch.cuda.default_stream()
    engine.close()


def test_concurrent_streams_with_batched_audio_equal_solo_runs(tiny_cuda):
    """8 streams at once, audio decoded in the engine by captured Mimi graphs: each stream's codes are
    its solo run's, and its audio is its solo run's within 0.5% of its RMS (cuDNN's tf32 convs by batch
    size: 1.7e-4 at RMS ~0.14 measured on an H200; different codes move the untrained Mimi's audio by
    half its RMS)."""
    from misotts.runtime.codec import load_codec

    codec = load_codec(None, device="cuda")
    engine = Engine(tiny_cuda, EngineConfig(max_batch=8, num_blocks=128), codec=codec)
    with torch.inference_mode():  # as the bench's first audio request does (it failed there on an H200)
        engine.start_audio()
    assert sorted(engine.audio._graphs) == engine.audio.buckets
    texts = [f"stream number {i} says something" for i in range(8)]
    prompts = [prompt(t) for t in texts]
    streams = [submit(engine, f, m, 10, stop_on_eos=False, temperature=0.9, seed=i, audio=True)
               for i, (f, m) in enumerate(prompts)]
    together = [list(s) for s in streams]
    for i, (f, m) in enumerate(prompts):
        solo = list(submit(engine, f, m, 10, stop_on_eos=False, temperature=0.9, seed=i, audio=True))
        assert torch.equal(torch.stack([x.codes for x in together[i]]), torch.stack([x.codes for x in solo]))
        want = torch.cat([x.audio for x in solo])
        torch.testing.assert_close(torch.cat([x.audio for x in together[i]]), want, rtol=0,
                                   atol=5e-3 * want.pow(2).mean().sqrt().item())
    engine.close()


def test_the_loop_never_syncs_the_host_but_on_a_frames_event(tiny_cuda):
    """Joins (prefill, lane setup), leaves (moves, clears), frames, code and audio copies: with
    torch's sync debug mode set to "error", any op that makes the host wait for the device (a
    pageable copy, .item(), a nonzero) raises.  Only the frames' events are waited on (an explicit
    Event.synchronize, which the mode allows)."""
    from misotts.runtime.codec import load_codec

    engine = Engine(tiny_cuda, EngineConfig(max_batch=4, num_blocks=128), codec=load_codec(None, device="cuda"))
    engine.start_audio()
    frames, mask = prompt()
    generate(engine, frames, mask, 2, stop_on_eos=False)  # the first turn's one-time work done
    torch.cuda.set_sync_debug_mode("error")
    try:
        streams = [submit(engine, *prompt(f"voice {i} speaks"), 4 + 2 * i, stop_on_eos=False, seed=i, audio=True)
                   for i in range(4)]  # different lengths: lanes leave one by one and are compacted
        got = [len(list(s)) for s in streams]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    engine.close()
    assert got == [4, 6, 8, 10]
