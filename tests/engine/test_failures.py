"""Failing cleanly: bad settings and bad requests are refused at the door, nothing a request
carries stops the loop, a device fault fails its requests without touching the device again,
and an engine that stops says so to every stream, to `submit` and to `health()`."""
import gc
import io
import sys
import threading
import time
import weakref

import pytest
import torch

from misotts.engine import Engine, EngineConfig, EngineStopped

from .conftest import generate, prompt, slow_frames, submit

GEN = dict(temperature=0.9, topk=50, stop_on_eos=False)


@pytest.mark.parametrize("field, value", [
    ("max_batch", -1), ("max_batch", 2.0), ("block_size", 0), ("block_size", 24), ("num_blocks", -3),
    ("prefill_chunk", 0), ("max_waiting", 0), ("kv_memory_fraction", 0.0), ("kv_memory_fraction", 1.5),
    ("wait_timeout_s", float("inf")), ("wait_timeout_s", -1), ("ops", "cuda"), ("cuda_graphs", "yes"),
    ("compile", 1),
])
def test_engine_config_is_checked_at_construction(field, value):
    with pytest.raises(ValueError, match=field if field != "ops" else "unknown ops"):
        EngineConfig(**{field: value})


def _with_id(column: int, value: int):
    frames, mask = prompt()
    frames = frames.clone()
    row = 0 if column == -1 else len(frames) - 1  # a text row, or the last row made an audio row
    if column != -1:
        mask = mask.clone()
        mask[row, :-1] = True
    frames[row, column] = value
    return frames, mask


@pytest.mark.parametrize("change, error, match", [
    (dict(seed=2**63), ValueError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), ValueError, "seed"),
    (dict(max_audio_ms=float("inf")), ValueError, "max_audio_ms"),
    (dict(max_audio_ms=True), ValueError, "max_audio_ms"),
    (dict(temperature=1e39), ValueError, "temperature"),
    (dict(temperature=1e-41), ValueError, "temperature"),
    (dict(temperature=1e-46), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(topk=50.0), ValueError, "topk"),
    (dict(rows=_with_id(-1, 10**6)), ValueError, "text id 1000000"),
    (dict(rows=_with_id(-1, -7)), ValueError, "text id -7"),
    (dict(rows=_with_id(3, 99999)), ValueError, "audio code 99999"),
    (dict(rows=_with_id(0, -2)), ValueError, "audio code -2"),
    (dict(rows=tuple(t.float() for t in prompt())), TypeError, "integer"),
])
def test_bad_requests_are_refused_by_submit_and_the_next_one_runs(engine, change, error, match):
    frames, mask = change.pop("rows", prompt())
    request = dict(frames=frames, mask=mask, max_frames=3, **GEN, seed=0) | change
    with pytest.raises(error, match=match):
        submit(engine, **request)
    assert len(generate(engine, *prompt(), 3, **GEN)) == 3
    assert engine.wait_idle() and engine.pool.all_free()


def test_an_error_in_admission_fails_only_its_request(engine, monkeypatch):
    frames, mask = prompt()
    poisoned = frames[:9], mask[:9]
    real_match = engine.pool.match

    def match(keys):
        if not keys:  # only the 9-row prompt has no full block to look up
            raise TypeError("bad request data")
        return real_match(keys)

    monkeypatch.setattr(engine.pool, "match", match)
    with pytest.raises(TypeError, match="bad request data"):
        generate(engine, *poisoned, 3, **GEN)
    assert len(generate(engine, frames, mask, 3, **GEN)) == 3
    assert engine.health()["ok"] and engine.wait_idle() and engine.pool.all_free()


class _ClosedPipe(io.TextIOBase):
    def write(self, text):
        raise BrokenPipeError("stderr is a closed pipe")


def _fail_frames(monkeypatch, engine, failing: set, message="CUDA error: an illegal memory access"):
    """Frames whose index (from 0) is in `failing` raise, as a device fault would."""
    run, frame = engine.graphs.run, [0]

    def flaky(n, *args, **kwargs):
        frame[0] += 1
        if frame[0] - 1 in failing:
            raise RuntimeError(message)
        return run(n, *args, **kwargs)

    monkeypatch.setattr(engine.graphs, "run", flaky)


def test_a_failing_step_with_stderr_closed_fails_its_requests_and_the_engine_goes_on(tiny_model, monkeypatch):
    engine = Engine(tiny_model, EngineConfig(max_batch=2))
    frames, mask = prompt()
    solo = generate(engine, frames, mask, 4, **GEN, seed=5)
    monkeypatch.setattr(sys, "stderr", _ClosedPipe())  # reporting the error must not kill the loop
    _fail_frames(monkeypatch, engine, failing={1})
    failing = [submit(engine, frames, mask, 4, **GEN, seed=s) for s in (1, 2)]
    for stream in failing:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            stream.codes()
    # The lanes were cleared after the fault: a new request gets its solo codes.
    assert torch.equal(generate(engine, frames, mask, 4, **GEN, seed=5), solo)
    assert engine.health() == {"ok": True, "state": "serving", "error": None}
    assert engine.wait_idle() and engine.pool.all_free()
    engine.close()


def test_a_sticky_device_fault_stops_the_engine_cleanly(tiny_model, monkeypatch):
    """After the fault every device op raises (as after a CUDA illegal address): the failing
    step's cleanup must not need the device, the streams get the step's error, and the engine
    stops with the reason in health() and in submit's EngineStopped."""
    engine = Engine(tiny_model, EngineConfig(max_batch=2))
    state, sticky = engine.runner.state, []

    def device_op(name):
        real = getattr(state, name)

        def op(*args):
            if sticky:
                raise RuntimeError("CUDA error: device-side assert triggered (again)")
            return real(*args)
        return op

    for name in ("move_lane", "clear_lane", "set_lane"):
        monkeypatch.setattr(state, name, device_op(name))
    run = engine.graphs.run

    def faulting(n, *args, **kwargs):
        sticky.append(True)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    frames, mask = prompt()
    monkeypatch.setattr(engine.graphs, "run", faulting)  # before submitting: the first frame faults, however fast
    del run
    with engine._cond:  # (re-entrant) the loop admits nothing until all three are queued: two share the fault
        running = [submit(engine, frames, mask, 6, **GEN, seed=s) for s in (1, 2)]
        queued = submit(engine, frames, mask, 6, **GEN, seed=3)  # no lane for it: it waits
    for stream in running:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            stream.codes()
    with pytest.raises(EngineStopped, match="device-side assert"):
        queued.codes()
    health = engine.health()
    assert not health["ok"] and health["state"] == "failed" and "device-side assert" in health["error"]
    with pytest.raises(EngineStopped, match="device-side assert"):
        submit(engine, frames, mask, 3, **GEN)
    assert engine.pool.all_free()
    engine.close()


def test_a_reader_never_waits_for_a_loop_that_is_gone(tiny_model, monkeypatch):
    engine = Engine(tiny_model, EngineConfig(max_batch=2))
    monkeypatch.setattr(engine, "_turn", lambda: None)  # the thread ends at once, finishing nothing
    stream = submit(engine, *prompt(), 3, **GEN)
    with pytest.raises(EngineStopped, match="without finishing"):
        stream.codes()
    engine.close(timeout=5)


def test_close_ends_requests_refuses_new_ones_and_says_closed(tiny_model, monkeypatch):
    engine = Engine(tiny_model, EngineConfig(max_batch=1))
    slow_frames(monkeypatch, engine, 0.01)  # 200 frames take >= 2 s: still running when closed
    frames, mask = prompt()
    running, queued = (submit(engine, frames, mask, 200, **GEN) for _ in range(2))
    reading = iter(running)
    next(reading)
    kv_pool = weakref.ref(engine.runner.kv.kv)
    engine.close()
    assert kv_pool() is None  # freed by close(), not whenever the collector finds the engine
    with pytest.raises(EngineStopped, match="closed"):
        list(reading)
    with pytest.raises(EngineStopped, match="closed"):
        queued.codes()
    with pytest.raises(EngineStopped, match="closed"):
        submit(engine, frames, mask, 3, **GEN)
    assert engine.health() == {"ok": False, "state": "closed", "error": None}
    assert engine.pool.all_free() and not engine._thread.is_alive()
    engine.close()  # twice: nothing more


def _wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        gc.collect()
        time.sleep(0.05)
    return True


def test_a_dropped_engine_is_freed_and_its_thread_ends(tiny_model):
    def use_and_drop():
        engine = Engine(tiny_model, EngineConfig(max_batch=2))
        assert len(generate(engine, *prompt(), 2, **GEN)) == 2
        return weakref.ref(engine), engine._thread

    ref, thread = use_and_drop()
    assert _wait_until(lambda: ref() is None), "the engine thread keeps a dropped engine alive"
    assert _wait_until(lambda: not thread.is_alive())
    assert not any(t is thread for t in threading.enumerate())
