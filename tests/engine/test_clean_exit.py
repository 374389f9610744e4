"""The TTS around the engine fails cleanly: inputs refused at the door with the right error type,
context audio sized before any work, asyncio never blocked, stats per stream, resources given
back on close, when dropped and at exit, and Ctrl-C reaching the caller."""
import asyncio
import gc
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import wave
import weakref

import numpy as np
import pytest
import torch

import misotts
from misotts.api import TTS
from misotts.runtime.generate import generate_codes
from misotts.runtime.tokenizer import ByteTokenizer

from .conftest import TINY, frames_wait_for, make_model


@pytest.fixture(scope="module")
def tts():
    with TTS(make_model(), ByteTokenizer(TINY.bos_id, TINY.eos_id), untrained=True) as tts:
        tts.start_engine({"max_batch": 4})
        yield tts


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(speaker=None), TypeError, "speaker"),
    (dict(speaker="x"), TypeError, "speaker"),
    (dict(speaker=-1), ValueError, "speaker"),
    (dict(speaker=10**100), ValueError, "speaker"),
    (dict(context=[misotts.Segment(0, None)]), TypeError, "segment text"),
    (dict(context=[misotts.Segment(None, "hi")]), TypeError, "speaker"),
    (dict(text=None), TypeError, "text"),
    (dict(max_audio_ms=float("inf")), ValueError, "max_audio_ms"),
    (dict(seed=2**63), ValueError, "seed"),
    (dict(temperature=1e39), ValueError, "temperature"),
    (dict(temperature=1e-41), ValueError, "temperature"),
    (dict(chunk_frames=2.5), ValueError, "chunk_frames"),
])
def test_bad_inputs_are_refused_with_the_right_error(tts, kwargs, error, match):
    kwargs = {"text": "Hello.", "max_audio_ms": 160} | kwargs
    with pytest.raises(error, match=match):
        list(tts.stream(**kwargs))
    assert tts.engine.wait_idle() and tts.engine.pool.all_free() and tts.engine.health()["ok"]


def test_uint8_segment_codes_are_accepted(tts):
    codes = np.arange(64, dtype=np.uint8).reshape(2, 32)
    as_uint8 = tts.generate_codes("Hi.", context=[misotts.Segment(1, "Yes.", codes=codes)], max_audio_ms=160)
    as_long = tts.generate_codes("Hi.", context=[misotts.Segment(1, "Yes.", codes=torch.as_tensor(codes).long())],
                                 max_audio_ms=160)
    assert torch.equal(as_uint8, as_long) and len(as_long) == 2


def _write_wav(path, samples: int, rate: int):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.zeros(samples, "<i2").tobytes())
    return path


@pytest.mark.parametrize("audio, match", [
    ((torch.zeros(48_000), 1), "sample rate 1 Hz"),
    ("one_hz.wav", "sample rate 1 Hz"),
    (torch.zeros(24_000 * 170), "170.0 s of context audio"),
    ("long.wav", "170.0 s of context audio"),
])
def test_context_audio_is_sized_before_any_work(tts, monkeypatch, tmp_path, audio, match):
    if audio == "one_hz.wav":
        audio = _write_wav(tmp_path / audio, 100, 1)
    elif audio == "long.wav":
        audio = _write_wav(tmp_path / audio, 24_000 * 170, 24_000)

    def never(source):
        raise AssertionError("context audio was loaded and encoded before its size was checked")

    monkeypatch.setattr(tts, "_encode_audio", never)
    with pytest.raises(ValueError, match=match):
        tts.generate_codes("Hello.", context=[misotts.Segment(1, "Earlier.", audio)], max_audio_ms=160)


def _capture_submits(monkeypatch, engine) -> list:
    """The streams `engine.submit` hands out, in order."""
    streams, submit = [], engine.submit

    def recording(*args, **kwargs):
        streams.append(submit(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(engine, "submit", recording)
    return streams


def _frames_wait_for_ticks(monkeypatch, engine, ticks: list, timeout: float = 30.0):
    """Every frame waits for a heartbeat tick that comes after it started: if anything blocked the
    event loop while a stream waits for that frame, the heartbeat could not tick and the frame
    raises TimeoutError."""
    run = engine.graphs.run

    def gated(n, *args, **kwargs):
        seen, deadline = len(ticks), time.monotonic() + timeout
        while len(ticks) == seen:
            if time.monotonic() > deadline:
                raise TimeoutError("the event loop was blocked: no heartbeat while a frame waited")
            time.sleep(0.001)
        run(n, *args, **kwargs)

    monkeypatch.setattr(engine.graphs, "run", gated)


async def _heartbeat(ticks: list):
    for _ in range(100_000):  # >= 200 s: cancelled long before
        await asyncio.sleep(0.002)
        ticks.append(1)


def test_astream_never_blocks_the_event_loop(tts, monkeypatch):
    ticks = []
    solo = tts.generate("Heartbeat.", max_audio_ms=480, seed=3)
    _frames_wait_for_ticks(monkeypatch, tts.engine, ticks)

    async def main():
        beat = asyncio.ensure_future(_heartbeat(ticks))
        chunks = [c async for c in tts.astream("Heartbeat.", max_audio_ms=480, seed=3)]
        beat.cancel()
        return chunks

    chunks = asyncio.run(main())
    assert torch.equal(torch.cat([c.codes for c in chunks]), solo.codes) and len(solo.codes) == 6


def test_cancelling_an_astream_task_takes_effect_at_the_next_frame(tts, monkeypatch):
    streams = _capture_submits(monkeypatch, tts.engine)
    cancelled, run, frame = threading.Event(), tts.engine.graphs.run, [0]

    def gated(n, *args, **kwargs):  # frames after the first wait until the task's cancellation has completed
        if frame[0] >= 1 and not cancelled.wait(30):
            raise TimeoutError("the task's cancellation never completed")
        frame[0] += 1
        run(n, *args, **kwargs)

    monkeypatch.setattr(tts.engine.graphs, "run", gated)

    async def main():
        first = asyncio.Event()

        async def consume():
            async for _ in tts.astream("Cancel me.", max_audio_ms=8000, stop_on_eos=False):
                first.set()

        task = asyncio.ensure_future(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled.set()

    asyncio.run(main())
    assert tts.engine.wait_idle() and tts.engine.pool.all_free()
    stats = streams[0].stats
    assert stats.finish == "cancelled" and stats.frames <= 2  # of 100


def test_four_astreams_are_served_together(tts, monkeypatch):
    texts = [f"Voice number {i}." for i in range(4)]
    solo = [tts.generate_codes(t, max_audio_ms=320, seed=i) for i, t in enumerate(texts)]
    submitted = _capture_submits(monkeypatch, tts.engine)
    # Frame f waits for request f: served one after another, the second would never be submitted.
    frames_wait_for(monkeypatch, tts.engine, submitted, len(texts))
    frames_before = tts.engine.frames_run

    async def one(i):
        return torch.cat([c.codes async for c in tts.astream(texts[i], max_audio_ms=320, seed=i)])

    async def main():
        return await asyncio.gather(*(one(i) for i in range(len(texts))))

    for got, want in zip(asyncio.run(main()), solo):
        assert torch.equal(got, want)
    assert tts.engine.frames_run - frames_before < sum(len(s) for s in solo)  # frames were shared


def test_stats_belong_to_the_stream_that_made_them(tts, monkeypatch):
    submitted = _capture_submits(monkeypatch, tts.engine)
    frames_wait_for(monkeypatch, tts.engine, submitted, 2)  # both streams run at once
    frames = [None, None]

    def run(i):
        stream = tts.stream(f"Thread {i}.", max_audio_ms=160 + 80 * i, stop_on_eos=False, seed=i)
        chunks = list(stream)
        frames[i] = (len(chunks), stream.stats.frames)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert frames == [(2, 2), (3, 3)]


def test_a_dropped_tts_is_freed_with_its_engine_thread():
    models = []
    for cycle in range(3):
        tts = misotts.load("tiny", device="cpu", engine={"max_batch": 2}, seed=cycle)
        assert len(tts.generate_codes("Hello.", max_audio_ms=160, stop_on_eos=False)) == 2
        models.append(weakref.ref(tts.model))
        del tts
    deadline = time.monotonic() + 20
    while any(m() is not None for m in models) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert all(m() is None for m in models), "a dropped TTS was kept alive"


def test_nan_weights_fail_the_request_on_both_paths(tts):
    model = make_model()
    model.backbone.norm.weight.data.fill_(float("nan"))
    frames, mask = tts.prompt("Broken weights.")
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        generate_codes(model, frames, mask, 3)
    broken = TTS(model, tts.tokenizer, untrained=True)
    broken.start_engine({"max_batch": 2})
    with broken:
        with pytest.raises(FloatingPointError, match="NaN or infinite"):
            broken.generate_codes("Broken weights.", max_audio_ms=240)
        assert broken.engine.wait_idle() and broken.engine.pool.all_free() and broken.engine.health()["ok"]


# ---- the process: exit and Ctrl-C while a request runs -------------------------------------------
_SCRIPT = textwrap.dedent('''
    import asyncio, sys
    import misotts

    tts = misotts.load("tiny", device="cpu", engine={"max_batch": 2}, progress=False)
    long = dict(max_audio_ms=600_000 // 8, stop_on_eos=False)  # 937 frames: runs well past the signal
    mode = sys.argv[1]
    if mode == "exit":
        stream = tts.submit("Still running at exit.", **long)
        next(iter(stream))
        print("started", flush=True)
        sys.exit(0)
    if mode == "thread":
        for i, chunk in enumerate(tts.stream("Interrupted.", **long)):
            if i == 0:
                print("started", flush=True)
    if mode == "asyncio":
        async def main():
            i = 0
            async for chunk in tts.astream("Interrupted.", **long):
                if i == 0:
                    print("started", flush=True)
                i += 1
        asyncio.run(main())
''')


def _run_script(tmp_path, mode: str, interrupt: bool):
    script = tmp_path / "speak.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # SIGINT back to its default in the child: a test run started in the background by a shell has it
    # ignored, which the child would inherit, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)  # loading takes seconds; never wait forever
        assert ready and proc.stdout.readline().strip() == "started", "the script did not start its request"
        if interrupt:
            proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "terminate called" not in stderr and proc.returncode != -signal.SIGABRT, stderr
    return proc.returncode, stderr


def test_exit_while_a_request_runs_is_clean(tmp_path):
    returncode, stderr = _run_script(tmp_path, "exit", interrupt=False)
    assert returncode == 0, stderr


@pytest.mark.parametrize("mode", ["thread", "asyncio"])
def test_ctrl_c_while_streaming_raises_keyboard_interrupt(tmp_path, mode):
    returncode, stderr = _run_script(tmp_path, mode, interrupt=True)
    assert "KeyboardInterrupt" in stderr and returncode in (1, -signal.SIGINT, 130), (returncode, stderr)
