"""The fault soak, CI-sized: valid, malformed, oversized, abandoned, trickled and WebSocket requests
against one server: no 500, /health within 100 ms throughout, memory flat, no KV block left."""
import asyncio

from misotts.server import create_app
from misotts.server.limits import Limits, uvicorn_settings
from misotts.server.soak import KINDS, run_soak

from .serving import no_blocks_held, running


def test_the_soak_finds_no_fault(tts):
    limits = Limits(max_body_bytes=2**20, header_timeout_s=1.0)  # oversized and slowloris stay cheap
    app = create_app(tts, model_name="tiny", limits=limits)
    # /health's bound here is 500 ms, not the soak command's 100: CI's 2 cores run another test file
    # beside this one, and 100 ms measured that (116 ms once), not the server.  What the bound exists
    # to catch -- work on the event loop, as the 2 MB FLAC context that stalled /health 7.3 s -- is
    # seconds; `python -m misotts.server.soak` on a quiet machine keeps the 100 ms default.
    with running(app, settings=uvicorn_settings(limits)) as url:
        result = asyncio.run(run_soak(url, requests=8 * len(KINDS), concurrency=8, body_limit=limits.max_body_bytes,
                                      header_timeout_s=limits.header_timeout_s, deadline_s=240, health_ms=500,
                                      max_rss_growth_mb=300))
    print(result.summary())
    assert result.failures == []
    assert sum(result.outcomes.values()) == 8 * len(KINDS)
    assert {key.split(":")[0] for key in result.outcomes} == set(KINDS)
    assert len(result.health_ms) > 10 and result.blocks_in_use_after == 0 and no_blocks_held(tts)
