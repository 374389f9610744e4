"""The pipelined loop (issue 22): frame t+1 is enqueued before frame t's codes are read; the
prompts admitted at one boundary prefill in one varlen call whose last hidden states start their
first frame (the backbone runs each prompt row once); each stream's first audio is broken down
into parts that sum to its total.  On the CPU, where the device runs each op as it is enqueued,
the order of the host's calls is what can be checked; the GPU suite checks the same loop never
syncs (tests/engine/test_cuda.py)."""
import time

import pytest
import torch

from misotts.engine import Engine, EngineConfig
from misotts.runtime.generate import generate_codes

from .conftest import make_model, params, prompt, submit

GEN = dict(temperature=0.9, topk=50, stop_on_eos=False)


def record_order(monkeypatch, engine) -> list:
    """[("enqueue", n) | ("read", n)]: each frame enqueued for n lanes, each frame's codes read."""
    log, run, postprocess = [], engine.graphs.run, engine.scheduler.postprocess

    def enqueue(n, *args, **kwargs):
        log.append(("enqueue", n))
        return run(n, *args, **kwargs)

    def read(lanes, codes, *args, **kwargs):
        log.append(("read", len(lanes)))
        return postprocess(lanes, codes, *args, **kwargs)

    monkeypatch.setattr(engine.graphs, "run", enqueue)
    monkeypatch.setattr(engine.scheduler, "postprocess", read)
    return log


@pytest.mark.parametrize("pipelined", [True, False])
def test_frame_t_plus_1_is_enqueued_before_frame_t_is_read(tiny_model, monkeypatch, pipelined):
    engine = Engine(tiny_model, EngineConfig(max_batch=2, pipelined=pipelined))
    log = record_order(monkeypatch, engine)
    frames, mask = prompt()
    got = submit(engine, frames, mask, 5, seed=3, **GEN).codes()
    assert engine.wait_idle()
    engine.close()
    events = [kind for kind, _ in log]
    if pipelined:  # one frame in flight: the 5 frames, one more run past the end, and never two unread
        assert events == ["enqueue", "enqueue", "read"] * 1 + ["enqueue", "read"] * 4 + ["read"]
    else:
        assert events == ["enqueue", "read"] * 5
    want = generate_codes(tiny_model, frames, mask, 5, seed=3, **GEN)
    assert torch.equal(got, want)  # whichever the order, the codes are the oracle's


def test_prompts_admitted_together_prefill_in_one_call_and_start_with_a_depth_only_frame(tiny_model, monkeypatch):
    engine = Engine(tiny_model, EngineConfig(max_batch=4))
    calls, runs = [], []
    prefill_many, run = engine.runner.prefill_many, engine.graphs.run
    monkeypatch.setattr(engine.runner, "prefill_many", lambda chunks: calls.append(len(chunks)) or prefill_many(chunks))
    monkeypatch.setattr(engine.graphs, "run", lambda n, backbone=True: runs.append((n, backbone)) or run(n, backbone))
    texts = ["Hello there.", "A second, longer prompt than the first one.", "Third."]
    prompts = [prompt(text, speaker=i) for i, text in enumerate(texts)]
    with engine._cond:  # the loop cannot take a turn until all three are queued
        streams = [submit(engine, f, m, 4, seed=i, **GEN) for i, (f, m) in enumerate(prompts)]
    got = [s.codes() for s in streams]
    engine.close()
    assert calls == [3]  # one varlen call for the three prompts
    assert runs[0] == (3, False)  # every lane fresh: the first frame is the depth decoder alone
    assert all(backbone for _, backbone in runs[1:])
    for i, ((f, m), codes) in enumerate(zip(prompts, got)):
        assert torch.equal(codes, generate_codes(tiny_model, f, m, 4, seed=i, **GEN)), i


def test_first_audio_reads_the_backbone_once(tiny_model, monkeypatch):
    """Before, the prompt's last row ran again in the first frame: two backbone passes.  Now the
    first frame is enqueued after one pass (the whole prompt) and runs none of its own; the passes
    are counted where each frame is enqueued, so the engine running on meanwhile cannot blur it."""
    engine = Engine(tiny_model, EngineConfig(max_batch=2))
    passes, backbone, run = [], engine.runner._backbone, engine.graphs.run
    passes_before_frame = []  # (passes so far, passes the frame itself ran) per frame

    def counted_run(n, backbone=True):
        before = len(passes)
        result = run(n, backbone)
        passes_before_frame.append((before, len(passes) - before))
        return result

    monkeypatch.setattr(engine.runner, "_backbone", lambda *a: passes.append(a[0].shape[0]) or backbone(*a))
    monkeypatch.setattr(engine.graphs, "run", counted_run)
    frames, mask = prompt()
    codes = submit(engine, frames, mask, 3, seed=1, **GEN).codes()
    engine.close()
    assert len(codes) == 3
    assert passes[0] == frames.shape[0]  # the whole prompt, its last row included, in one pass ...
    assert passes_before_frame[0] == (1, 0)  # ... before the first frame, which runs no backbone pass
    assert all(own == 1 for _, own in passes_before_frame[1:])  # the later frames run one each


def test_a_request_joining_running_lanes_equals_its_solo_run(tiny_model, monkeypatch):
    """The joiner's first frame runs the full frame with the lanes already running (their frame
    reads the backbone anyway), its row again: its codes and the running request's equal solo runs."""
    from .conftest import frames_wait_for

    engine = Engine(tiny_model, EngineConfig(max_batch=4))
    submitted = []
    frames_wait_for(monkeypatch, engine, submitted, 2)
    a, b = prompt("The first one speaks for a while.", 0), prompt("Then a second joins.", 1)
    sa = submit(engine, *a, 6, seed=5, **GEN)
    submitted.append(sa)
    sb = submit(engine, *b, 4, seed=6, **GEN)
    submitted.append(sb)
    got_a, got_b = sa.codes(), sb.codes()
    engine.close()
    assert torch.equal(got_a, generate_codes(tiny_model, *a, 6, seed=5, **GEN))
    assert torch.equal(got_b, generate_codes(tiny_model, *b, 4, seed=6, **GEN))


def test_first_audio_breakdown_sums_to_what_the_caller_waited(tiny_model):
    from misotts.runtime.codec import load_codec

    engine = Engine(tiny_model, EngineConfig(max_batch=2), codec=load_codec(None))
    frames, mask = prompt()
    started = time.perf_counter()
    stream = engine.submit(frames, mask, params(3, seed=2, **GEN), audio=True)
    first = next(iter(stream))
    waited_ms = (time.perf_counter() - started) * 1e3
    parts = stream.stats.first_audio_ms()
    stream.cancel()
    engine.close()
    assert first.audio is not None
    names = ("queue", "prefill", "first_frame", "audio_decode", "hand_off")
    assert all(parts[name] >= 0 for name in names), parts  # the marks are in order
    assert sum(parts[name] for name in names) == pytest.approx(parts["total"], abs=1e-6)
    assert 0 < parts["total"] <= waited_ms  # the caller waited at least that (submit is inside)
    # the prefill and the frame are real work on a CPU; with audio asked for, so is its decode
    assert parts["prefill"] > 0 and parts["first_frame"] > 0 and parts["audio_decode"] > 0, parts


def test_warm_up_prefill_lengths_cover_every_kernel_variant_a_chunk_can_meet():
    """Every chunk length 1..200 falls in the same variant class as some warm-up length: the fused
    norm + GEMV's row tile (read from its launcher, bf16), Triton's == 1 and divisible-by-16
    specialisations, and fused vs rmsnorm + cuBLAS past fused_rows."""
    from misotts.engine.engine import prefill_warmup_lengths
    from misotts.engine.ops import TritonOps
    from misotts.kernels.norm_linear import _tiles

    fused = TritonOps.fused_rows

    def variant(rows):
        tile = _tiles(rows, 4096, torch.bfloat16)[0] if rows <= fused else None
        return tile, rows == 1, rows % 16 == 0

    warmed = {variant(n) for n in prefill_warmup_lengths(16, fused)}
    assert {variant(n) for n in range(1, 201)} <= warmed
