"""The steady load and the staggered arrivals on the real engine (`tiny`, seeded random weights,
CPU, not compiled): every stream is read, counted and cancelled, and the engine is left idle
with its KV blocks free (no timings asserted)."""
import math

import pytest

import misotts
from misotts.bench.systems import EngineSystem, Workload


@pytest.fixture(scope="module")
def system():
    tts = misotts.load("tiny", device="cpu", random_init=True, seed=5)
    tts.codec
    system = EngineSystem(tts, max_batch=3, max_positions=128, compile=False)
    yield system
    system.close()


def blocks_in_use(system):
    pool = system.engine.pool
    pool.clear_cache()  # blocks kept only as prefix cache are not in use
    return pool.num_blocks - pool.available()


def test_steady_run_on_the_engine(system, one_thread):
    run = system.steady(Workload("short", "Hello! How are you today?"), 3, window_frames=2, frames=60, seed=0)
    assert run["frames"] >= 3 * 2 and len(run["gap_p99_ms"]) == 3
    assert all(math.isfinite(g) and g > 0 for g in run["gap_p99_ms"])
    assert run["reader_backlog_frames"] <= 3  # no timing: just that the readers were taking frames
    assert system.engine.stats()["running"] == 0 and blocks_in_use(system) == 0


def test_arrivals_into_a_running_load_on_the_engine(system, one_thread):
    system.forget()
    reused = system.engine.stats()["reused_positions"]
    out = system.arrivals(Workload("short", "Hello! How are you today?"), background=2, probes=2, frames=60, seed=0)
    assert len(out["ttfa_ms"]) == 2 and all(t > 0 for t in out["ttfa_ms"])
    assert len(out["background_gap_p99_ms"]) == 2
    for parts in out["first_audio_ms"]:  # the engine's breakdown: its total is the reader's first take
        assert math.isfinite(parts["total"]) and parts["total"] > 0
    assert system.engine.stats()["reused_positions"] == reused  # each prompt its own: all prefilled
    assert blocks_in_use(system) == 0
