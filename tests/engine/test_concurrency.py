"""Many requests share one engine: outputs equal solo runs, limits give clear errors, cancelling frees."""
import asyncio
import threading
import time

import pytest
import torch

from misotts.engine import Engine, EngineConfig
from misotts.engine.requests import EngineBusy

from .conftest import TINY, frames_wait_for, generate, history, prompt, slow_frames, submit

GEN = dict(temperature=0.9, topk=50, stop_on_eos=False)


def requests(count):
    """Different prompts, seeds, lengths and temperatures (one greedy)."""
    out = []
    for i in range(count):
        frames, mask = prompt(f"Request {i} says something.", i % 2, history(1, frames=3 + i, name=f"{i}"))
        out.append(dict(frames=frames, mask=mask, max_frames=3 + i % 4, seed=100 + i,
                        temperature=0.0 if i == 3 else 0.9, topk=50, stop_on_eos=False))
    return out


def test_eight_threads_equal_their_solo_runs(tiny_model, monkeypatch):
    reqs = requests(8)
    solo_engine = Engine(tiny_model, EngineConfig(max_batch=1))
    solo = [generate(solo_engine, **r) for r in reqs]
    solo_engine.close()

    engine = Engine(tiny_model, EngineConfig(max_batch=8, prefill_chunk=32))
    submitted = []
    # Frame f waits for request f: each request joins a running batch, whatever the machine's speed.
    frames_wait_for(monkeypatch, engine, submitted, len(reqs))
    results = [None] * len(reqs)

    def run(i):
        time.sleep(0.02 * i)  # staggered: requests join a running batch and leave at different frames
        stream = submit(engine, **reqs[i])
        submitted.append(i)
        results[i] = stream.codes()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (got, want) in enumerate(zip(results, solo)):
        assert torch.equal(got, want), f"request {i}"
    assert engine.wait_idle() and engine.pool.all_free()
    assert engine.frames_run < sum(len(s) for s in solo)  # frames were shared
    engine.close()


def test_asyncio_streams_equal_solo_runs(tiny_model):
    reqs = requests(4)
    engine = Engine(tiny_model, EngineConfig(max_batch=4))
    solo = [generate(engine, **r) for r in reqs]

    async def collect(r):
        return torch.stack([frame.codes async for frame in submit(engine, **r)])

    async def main():
        return await asyncio.gather(*(collect(r) for r in reqs))

    for got, want in zip(asyncio.run(main()), solo):
        assert torch.equal(got, want)
    assert engine.wait_idle() and engine.pool.all_free()
    engine.close()


def test_prompt_longer_than_context_fails_at_once(engine):
    frames, mask = prompt()
    long = frames.repeat(2048 // len(frames) + 1, 1), mask.repeat(2048 // len(mask) + 1, 1)
    with pytest.raises(ValueError, match="context window"):
        submit(engine, *long, 10)
    with pytest.raises(ValueError, match="context window"):
        submit(engine, frames, mask, 2048)
    assert engine.stats()["waiting"] == 0


def test_text_id_outside_the_vocabulary_fails_at_once(engine):
    frames, mask = prompt()
    vocab = TINY.text_vocab_size
    frames[0, -1] = vocab  # one past the last text id: never clamped to it
    with pytest.raises(ValueError, match=f"text id {vocab} .* {vocab}"):
        submit(engine, frames, mask, 10)
    assert engine.stats()["waiting"] == 0

def test_full_pool_waits_then_fails_clearly(tiny_model, monkeypatch):
    frames, mask = prompt()
    blocks = -(-(len(frames) + 40 - 1) // 16)  # one request of 40 frames
    engine = Engine(tiny_model, EngineConfig(max_batch=4, num_blocks=blocks + 1, wait_timeout_s=0.5))
    slow_frames(monkeypatch, engine, 0.05)  # the holder's 40 frames take >= 2 s: it outlives the 0.5 s wait
    with pytest.raises(ValueError, match="KV blocks"):  # could never fit: refused at once
        submit(engine, frames, mask, 16 * (blocks + 2))
    holder = submit(engine, frames, mask, 40, **GEN)
    reading = iter(holder)  # (dropping an iterator closes it, which would cancel the request)
    next(reading)  # running and holding all but one block
    other = prompt("Different words: no shared prefix.")
    waiter = submit(engine, *other, 40, **GEN)
    started = time.monotonic()
    with pytest.raises(EngineBusy, match="KV blocks"):
        waiter.codes()
    assert time.monotonic() - started >= 0.4
    # Waiting succeeds when blocks free up in time: cancel the holder while the next one waits.
    patient = submit(engine, *other, 40, **GEN)
    holder.cancel()
    assert len(patient.codes()) == 40
    assert engine.wait_idle() and engine.pool.all_free()
    engine.close()


def test_bounded_queue_refuses_when_full(tiny_model, monkeypatch):
    engine = Engine(tiny_model, EngineConfig(max_batch=1, max_waiting=1))
    slow_frames(monkeypatch, engine, 0.02)  # the running request's 50 frames take >= 1 s
    frames, mask = prompt()
    running = submit(engine, frames, mask, 50, **GEN)
    reading = iter(running)
    next(reading)
    queued = submit(engine, frames, mask, 2, **GEN)  # waits for the lane
    with pytest.raises(EngineBusy, match="waiting"):
        submit(engine, frames, mask, 2, **GEN)
    running.cancel()
    assert len(queued.codes()) == 2
    engine.close()


def test_cancelling_frees_blocks_and_spares_the_others(tiny_model, monkeypatch):
    reqs = requests(3)
    engine = Engine(tiny_model, EngineConfig(max_batch=4))
    slow_frames(monkeypatch, engine, 0.01)  # 100 frames take >= 1 s: still running when cancelled at 0.3 s
    solo = generate(engine, **reqs[2])
    frames, mask = prompt()
    # 1. Breaking out of the loop closes the iterator, which cancels the request.
    closed = submit(engine, frames, mask, 100, **GEN)
    other = submit(engine, **reqs[2])
    for i, _ in enumerate(closed):
        if i == 1:
            break
    assert torch.equal(other.codes(), solo)  # the neighbour is unaffected
    assert engine.wait_idle() and engine.pool.all_free()
    assert closed.stats.finish == "cancelled" and closed.stats.frames < 100
    # 2. Cancelling an asyncio task that is reading a stream; its event loop then closes while the
    # engine still has a frame in flight for it.  A neighbour runs throughout.
    neighbour_request = {**reqs[1], "max_frames": 20}
    neighbour_solo = generate(engine, **neighbour_request)
    neighbour = submit(engine, **neighbour_request)
    task_stream = submit(engine, frames, mask, 100, **GEN)

    async def consume():
        async for _ in task_stream:
            pass

    async def main():
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert torch.equal(neighbour.codes(), neighbour_solo)
    # 3. Cancelled while still queued.
    submit(engine, frames, mask, 100, **GEN).cancel()
    assert engine.wait_idle()
    assert engine.pool.all_free()
    assert task_stream.stats.finish == "cancelled" and task_stream.stats.frames < 100
    engine.close()


def test_a_failing_request_does_not_stop_the_engine(tiny_model, monkeypatch):
    engine = Engine(tiny_model, EngineConfig(max_batch=2))
    real_prefill = engine.runner.prefill_many

    def flaky_prefill(chunks):  # both prompts may prefill in one call: it fails, then each alone
        if any(frames.shape[0] == 8 for frames, *_ in chunks):  # only the poisoned request has an 8-row chunk
            raise RuntimeError("boom")
        return real_prefill(chunks)

    monkeypatch.setattr(engine.runner, "prefill_many", flaky_prefill)
    frames, mask = prompt()
    bad = submit(engine, frames[:8], mask[:8], 3, **GEN)
    good = submit(engine, frames, mask, 3, **GEN)
    with pytest.raises(RuntimeError, match="boom"):
        bad.codes()
    assert len(good.codes()) == 3
    assert engine.wait_idle() and engine.pool.all_free()
    engine.close()


def test_engine_decodes_each_streams_audio_like_a_solo_decoder(tiny_model, monkeypatch):
    """Audio made in the engine (one batched Mimi call per frame, lanes joining, leaving and being
    compacted) equals each request's codes decoded alone by a streaming decoder."""
    from misotts.runtime.codec import load_codec
    from misotts.runtime.prompt import mimi_codes

    codec = load_codec(None)
    engine = Engine(tiny_model, EngineConfig(max_batch=4), codec=codec)
    submitted = []
    frames_wait_for(monkeypatch, engine, submitted, 3)
    reqs = requests(3)  # 3, 4 and 5 frames: they join at frames 0..2 and leave at different frames
    streams = []
    for r in reqs:
        with torch.inference_mode():  # the first audio request makes the lanes' decoder: in a caller's mode
            streams.append(submit(engine, **r, audio=True))
        submitted.append(r)
    for stream in streams:
        frames = list(stream)
        codes = torch.stack([f.codes for f in frames])
        with codec.stream_decoder(1) as decoder:
            want = torch.cat([decoder.decode_frame(mimi_codes(c[None]))[0] for c in codes])
        torch.testing.assert_close(torch.cat([f.audio for f in frames]), want, rtol=0, atol=1e-6)
    assert engine.wait_idle() and engine.pool.all_free()
    assert not engine.audio._codes.is_inference()  # CUDA graphs read it; the engine thread writes it
    engine.close()
    with pytest.raises(ValueError, match="codec"):
        submit(Engine(tiny_model, EngineConfig(max_batch=1)), *prompt(), 2, audio=True)


def test_a_codec_that_cannot_be_had_fails_only_audio_requests(tiny_model):
    """The codec is made at the first audio request: offline, a real checkpoint's engine still
    serves codes, and the audio request gets the codec's error."""
    def offline():
        raise FileNotFoundError("could not get the Mimi weights (offline)")

    engine = Engine(tiny_model, EngineConfig(max_batch=1), codec=offline)
    assert len(generate(engine, *prompt(), 2, **GEN)) == 2
    with pytest.raises(FileNotFoundError, match="offline"):
        submit(engine, *prompt(), 2, audio=True)
    engine.close()
