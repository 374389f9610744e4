"""The soak (misotts.bench.soak) at CI size: hundreds of requests from 8 threads with malformed
requests, cancels and failing steps mixed in -- exact codes, no leaked block, no hang, flat memory."""
from misotts.bench.soak import run_soak

from .conftest import make_model, submit

# Resident memory may grow this much between the warm-up tenth and the end: glibc keeps freed
# heap in its per-thread arenas (8 threads here), so some MB come and go.  A leaked request is
# caught exactly instead: no Request object may outlive the engine.
RSS_MARGIN_MB = 24


def test_soak_with_faults_is_exact_and_gives_everything_back():
    model = make_model()
    result = run_soak(model, requests=330, threads=8, fault_every=29, deadline_s=300)
    assert result.hangs == 0 and result.unexpected_errors == [], result
    assert result.mismatches == 0 and result.leaked_blocks == 0 and result.leaked_requests == 0, result
    # Every kind of event happened.
    assert result.refused == 30 and result.cancelled > 20 and result.failed_by_fault > 0, result
    assert result.completed + result.refused + result.cancelled + result.failed_by_fault == result.requests
    assert result.rss_end_mb - result.rss_start_mb < RSS_MARGIN_MB, result


def test_the_leak_count_sees_a_request_that_is_still_held():
    import gc

    from misotts.bench.soak import _track_requests
    from misotts.engine import Engine, EngineConfig

    from .conftest import prompt

    engine = Engine(make_model(), EngineConfig(max_batch=1))
    made = _track_requests(engine)
    frames, mask = prompt("Held on to.", 0)
    held = submit(engine, frames, mask, 2)
    list(held)
    engine.close()
    gc.collect()
    assert len(made) == 1  # the caller still holds its stream, and so the request
    del held
    gc.collect()
    assert len(made) == 0
