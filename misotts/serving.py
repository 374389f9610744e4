"""Engine-backed speech for a `TTS`: streaming audio, conversations, many requests at once.

    tts = misotts.load("tiny", backend="auto")       # attaches an Engine (see docs/engine.md)
    for chunk in tts.stream("Hello.", seed=1): ...    # Audio chunks; the first after 1 frame
    chat = tts.conversation()
    a = chat.say("Hi, how are you?", speaker=0)       # each turn joins the history ...
    b = chat.say("Fine, thanks.", speaker=1)          # ... and the next reuses its KV cache

Every function here takes the TTS first, so `misotts.api` only forwards to them.  Requests
from many threads or asyncio tasks share the TTS's engine, which also decodes every running
stream's audio, in one batched streaming Mimi call per frame.
"""
from __future__ import annotations

from typing import AsyncIterator, Iterator

import torch

from misotts.chunks import Audio, Chunker, GenerationStats
from misotts.runtime.codec import mimi_codes
from misotts.runtime.engine import Engine, EngineConfig
from misotts.runtime.generate import max_frames_for
from misotts.runtime.prompt import Segment, check_audio_path, check_codes
from misotts.runtime.scheduler import Stream


def attach_engine(tts, config: EngineConfig | dict | None = None, progress: bool = False) -> Engine:
    """Build the engine for tts.model (warm-up and, on CUDA, graph capture happen here)."""
    if isinstance(config, dict):
        config = EngineConfig(**config)
    tts.engine = Engine(tts.model, config, progress=progress, codec=tts.codec)
    return tts.engine


def _engine(tts) -> Engine:
    engine = getattr(tts, "engine", None)
    if engine is None:
        raise RuntimeError("this TTS has no engine: load it with backend='auto' (or call serving.attach_engine)")
    return engine


def submit(tts, text: str, speaker: int = 0, context=(), max_audio_ms: float = 10_000, temperature: float = 0.9,
           topk: int = 50, seed: int = 0, stop_on_eos: bool = True, audio: bool = False) -> Stream:
    """Queue a generation and return its `Stream` of frames at once (iterate it, or `async for`)."""
    frames, mask = tts.prompt(text, speaker, context)
    return _engine(tts).submit(frames, mask, max_frames_for(max_audio_ms), temperature=temperature, topk=topk,
                               seed=seed, stop_on_eos=stop_on_eos, audio=audio)


def iter_codes(tts, text: str, speaker: int = 0, context=(), max_audio_ms: float = 10_000,
               temperature: float = 0.9, topk: int = 50, seed: int = 0, stop_on_eos: bool = True
               ) -> Iterator[torch.Tensor]:
    for frame in submit(tts, text, speaker, context, max_audio_ms, temperature, topk, seed, stop_on_eos):
        yield frame.codes


# ---- audio ---------------------------------------------------------------------------------
def _chunks(tts, frames: Stream, stats: GenerationStats, chunker: Chunker, frame) -> Audio | None:
    """Add one engine frame (its audio decoded in the engine) to the chunker; the request's
    prefix-cache figures go into the TTS-level stats."""
    stats.reused_positions = frames.stats.reused_positions
    stats.computed_positions = frames.stats.computed_positions
    return chunker.add(frame.codes, frame.audio)


def stream(tts, text: str, speaker: int = 0, context=(), max_audio_ms: float = 10_000, temperature: float = 0.9,
           topk: int = 50, seed: int = 0, chunk_frames: int = 1, first_chunk_frames: int = 1,
           stop_on_eos: bool = True) -> Iterator[Audio]:
    """`Audio` chunks as frames are made: the first after `first_chunk_frames` frames, then every
    `chunk_frames`.  Concatenated, they equal `generate()` with the same arguments.  Closing the
    iterator early cancels the request and frees its KV blocks."""
    stats = tts.last_stats = GenerationStats()
    chunker = Chunker(stats, first_chunk_frames, chunk_frames)
    frames = submit(tts, text, speaker, context, max_audio_ms, temperature, topk, seed, stop_on_eos, audio=True)
    try:
        for frame in frames:
            chunk = _chunks(tts, frames, stats, chunker, frame)
            if chunk is not None:
                yield chunk
        chunk = chunker.flush()
        if chunk is not None:
            yield chunk
    finally:
        frames.cancel()


async def astream(tts, text: str, speaker: int = 0, context=(), max_audio_ms: float = 10_000,
                  temperature: float = 0.9, topk: int = 50, seed: int = 0, chunk_frames: int = 1,
                  first_chunk_frames: int = 1, stop_on_eos: bool = True) -> AsyncIterator[Audio]:
    """`stream` for asyncio: `async for chunk in astream(tts, ...)`.  Cancelling the task
    cancels the request.  The audio is decoded in the engine's thread."""
    stats = tts.last_stats = GenerationStats()
    chunker = Chunker(stats, first_chunk_frames, chunk_frames)
    frames = submit(tts, text, speaker, context, max_audio_ms, temperature, topk, seed, stop_on_eos, audio=True)
    try:
        async for frame in frames:
            chunk = _chunks(tts, frames, stats, chunker, frame)
            if chunk is not None:
                yield chunk
        chunk = chunker.flush()
        if chunk is not None:
            yield chunk
    finally:
        frames.cancel()


def generate(tts, text: str, speaker: int = 0, context=(), max_audio_ms: float = 10_000, temperature: float = 0.9,
             topk: int = 50, seed: int = 0, stop_on_eos: bool = True) -> Audio:
    chunks = list(stream(tts, text, speaker, context, max_audio_ms, temperature, topk, seed, chunk_frames=8,
                         stop_on_eos=stop_on_eos))
    return Audio.concat(chunks, tts.config.num_codebooks)


# ---- conversations -----------------------------------------------------------------------------
class Conversation:
    """A dialogue whose turns -- generated or given -- become the context of the next turn.

    The engine keeps the KV of earlier turns in its prefix cache, so a new turn prefills only
    its own text (and the audio of given turns not seen before): time to first audio does not
    grow with the history.  Works on the reference backend too, without the reuse.
    """

    def __init__(self, tts, context=()):
        self.tts = tts
        self.history: list[Segment] = list(context)
        # The last turn's stats (reused_positions / computed_positions among them): the TTS's
        # GenerationStats after an audio turn, the engine's RequestStats after say_codes.
        self.last_stats = None

    def _remember(self, speaker: int, text: str, codes: torch.Tensor) -> None:
        # What was heard: special ids (which only an untrained model emits) were played as code 0.
        self.history.append(Segment(speaker, text, codes=mimi_codes(codes)))

    def add(self, speaker: int, text: str, audio=None, codes=None) -> None:
        """A turn that was spoken, not generated: its audio (or Mimi codes) joins the history."""
        # Checked here, not at the next turn: a bad turn would make every later turn fail.
        if audio is not None and codes is not None:
            raise ValueError("give a turn audio or codes, not both")
        check_audio_path(audio)
        if codes is not None:
            codes = check_codes(codes, self.tts.config.num_codebooks)
        self.history.append(Segment(speaker, text, audio=audio, codes=codes))

    def stream(self, text: str, speaker: int = 0, **kwargs) -> Iterator:
        """Speak a turn as `Audio` chunks; the frames made (all of them, or as many as were made
        before the caller stopped) join the history when the iterator ends.  A turn that fails
        joins nothing."""
        made, heard = [], False
        speak = stream if getattr(self.tts, "engine", None) is not None else type(self.tts).stream
        try:
            for chunk in speak(self.tts, text, speaker, list(self.history), **kwargs):
                made.append(chunk.codes)
                yield chunk
            heard = True
        except GeneratorExit:  # the caller stopped: what was made so far was heard
            heard = True
            raise
        finally:
            self.last_stats = self.tts.last_stats
            if heard:
                n = self.tts.config.num_codebooks
                self._remember(speaker, text, torch.cat(made) if made else torch.zeros(0, n, dtype=torch.long))

    def say(self, text: str, speaker: int = 0, **kwargs):
        """Speak a turn: the whole `Audio` (as `TTS.generate`), added to the history."""
        chunks = list(self.stream(text, speaker, chunk_frames=kwargs.pop("chunk_frames", 8), **kwargs))
        return Audio.concat(chunks, self.tts.config.num_codebooks)

    def say_codes(self, text: str, speaker: int = 0, **kwargs) -> torch.Tensor:
        """A turn's codes only (no audio decoding), added to the history."""
        if getattr(self.tts, "engine", None) is not None:
            request = submit(self.tts, text, speaker, list(self.history), **kwargs)
            codes, self.last_stats = request.codes(), request.stats
        else:
            codes = self.tts.generate_codes(text, speaker=speaker, context=list(self.history), **kwargs)
        self._remember(speaker, text, codes)
        return codes
