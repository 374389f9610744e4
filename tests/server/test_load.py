"""64 concurrent streaming requests against the tiny model: all served, none leaks a block."""
import asyncio

from misotts.server.loadtest import run_load

from .serving import no_blocks_held


def test_64_concurrent_streams_are_all_served_and_leak_no_block(server, tts):
    result = asyncio.run(run_load(server, requests=64, max_audio_ms=160, deadline_s=240))
    print(result.summary())
    assert result.errors == {} and result.completed == 64
    assert len(result.ttfa_s) == 64 and all(0 < t <= s for t, s in zip(result.ttfa_s, result.total_s))
    assert abs(result.audio_s - 64 * 0.16) < 1e-6  # every request ran its 2 frames
    assert result.blocks_in_use_after == 0 and no_blocks_held(tts)
