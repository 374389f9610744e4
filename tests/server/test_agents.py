"""The voice-agent frameworks as real clients, configured as their docs say for an OpenAI-compatible
server (base_url): Pipecat's OpenAITTSService and LiveKit Agents' OpenAI TTS plugin.  Each test
is skipped only when its framework is not installed (pip install -e ".[agents]").

A ~5 s utterance: its first audio frame must reach the framework before half the time the whole
takes (streamed, not a file at the end), and the audio must be `generate`'s with the same seed."""
import asyncio
import time

import pytest

from misotts.server import create_app

from .serving import expected_pcm, running

TEXT = "Hello there, this is a test of streaming speech."
SEED, AUDIO_MS = 7, 5000  # untrained weights never stop early: 5 s of audio, 62 frames
RATE = 24_000


@pytest.fixture(scope="module")
def agent_server(tts):
    # The frameworks send OpenAI's fields only; the seed and the utterance's length (our extensions)
    # come from the server's request defaults.
    app = create_app(tts, model_name="tiny", request_defaults={"seed": SEED, "max_audio_ms": AUDIO_MS})
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def reference(tts) -> bytes:
    return expected_pcm(tts, TEXT, speaker=0, seed=SEED, max_audio_ms=AUDIO_MS)  # "alloy" is speaker 0


def check_streamed(start: float, arrivals: list[float]) -> None:
    first, total = arrivals[0] - start, arrivals[-1] - start
    assert first < total / 2, (first, total)


def test_pipecat_openai_tts_service_streams_generates_audio(agent_server, reference):
    pytest.importorskip("pipecat")
    from pipecat.frames.frames import EndFrame, TTSAudioRawFrame, TTSSpeakFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.services.openai.tts import OpenAITTSService
    from pipecat.workers.runner import WorkerRunner

    received = []

    class Collect(FrameProcessor):
        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, TTSAudioRawFrame):
                received.append((time.perf_counter(), frame.audio, frame.sample_rate, frame.num_channels))
            await self.push_frame(frame, direction)

    async def speak() -> float:
        # stop_frame_timeout_s: the CPU makes 5 s of audio in ~15 s; Pipecat's default 3 s of
        # silence between its 0.5 s chunks would end the utterance early
        tts = OpenAITTSService(api_key="unused", base_url=f"{agent_server}/v1", stop_frame_timeout_s=60,
                               settings=OpenAITTSService.Settings(model="tiny", voice="alloy"))
        worker = PipelineWorker(Pipeline([tts, Collect()]), params=PipelineParams(audio_out_sample_rate=RATE))
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        start = time.perf_counter()
        await worker.queue_frames([TTSSpeakFrame(TEXT), EndFrame()])
        await asyncio.wait_for(runner.run(), 300)
        return start

    start = asyncio.run(speak())
    assert received and {(r[2], r[3]) for r in received} == {(RATE, 1)}
    check_streamed(start, [r[0] for r in received])
    assert b"".join(r[1] for r in received) == reference  # pcm16, byte for byte


def test_livekit_openai_tts_plugin_streams_generates_audio(agent_server, reference):
    lk_openai = pytest.importorskip("livekit.plugins.openai")

    async def speak():
        tts = lk_openai.TTS(model="tiny", voice="alloy", base_url=f"{agent_server}/v1", api_key="unused",
                            response_format="pcm")
        frames, start = [], time.perf_counter()
        try:
            async with tts.synthesize(TEXT) as stream:
                async for event in stream:
                    f = event.frame
                    frames.append((time.perf_counter(), bytes(f.data), f.sample_rate, f.num_channels))
        finally:
            await tts.aclose()
        return start, frames

    start, frames = asyncio.run(asyncio.wait_for(speak(), 300))
    assert frames and {(f[2], f[3]) for f in frames} == {(RATE, 1)}
    check_streamed(start, [f[0] for f in frames])
    audio = b"".join(f[1] for f in frames)
    # LiveKit's emitter cuts audio into 10 ms frames and ends with a silent one (here the audio
    # filled its frames exactly, and a whole zero frame followed): generate's audio byte for byte,
    # then at most 240 zero samples
    assert audio[: len(reference)] == reference
    tail = audio[len(reference):]
    assert len(tail) <= 2 * RATE // 100 and tail == bytes(len(tail))
