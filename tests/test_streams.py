"""One stream contract: what TTS.stream returns carries its own stats and prompt accounting, and
runtime.prompt counts a prompt's positions exactly as build_prompt and Mimi make them."""
import pytest
import torch

import misotts
from misotts.chunks import ChunkStream
from misotts.runtime.frames import FrameStream
from misotts.runtime.prompt import Segment, audio_positions, build_prompt, prompt_positions


@pytest.fixture(scope="module")
def tts():
    with misotts.load("tiny", device="cpu", engine={"max_batch": 2}) as tts:
        yield tts


def test_a_streams_stats_and_prompt_accounting_are_its_own(tts):
    context = [Segment(1, "An earlier turn.", codes=torch.randint(0, 2048, (20, 32)))]
    first = tts.stream("Same start.", context=context, max_audio_ms=160, stop_on_eos=False)
    assert isinstance(first, ChunkStream)
    list(first)
    second = tts.stream("Same start.", context=context, max_audio_ms=240, stop_on_eos=False)
    list(second)
    prompt_len = len(tts.prompt("Same start.", 0, context)[0])
    for stream, frames in ((first, 2), (second, 3)):
        s = stream.stats
        assert s.frames == frames and s.prompt_positions == prompt_len
        assert s.reused_positions + s.computed_positions == prompt_len
    # the second reuses the first's full blocks: (prompt_len - 1) // 16 of them
    assert (first.stats.reused_positions, second.stats.reused_positions) == (0, 16 * ((prompt_len - 1) // 16))
    frames = tts.submit("Frames.", max_audio_ms=80)
    assert isinstance(frames, FrameStream) and len(frames.codes()) <= 1


@pytest.mark.parametrize("samples, rate", [(1920 * 3, 24_000), (1920 * 3 + 1, 24_000), (5000, 24_000),
                                           (16_000, 16_000)])
def test_audio_positions_are_the_frames_mimi_makes(tts, samples, rate):
    audio = torch.zeros(samples) if rate == 24_000 else (torch.zeros(samples), rate)
    segment = Segment(0, "x", audio=audio)
    frames, _ = build_prompt("Now.", 1, [segment], tts.tokenizer, 32, tts._encode_audio)
    assert prompt_positions("Now.", 1, [segment], tts.tokenizer) == len(frames)
    assert audio_positions(segment) == len(tts._encode_audio(audio)) + 1
