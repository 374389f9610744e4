"""Engine-backed speech for a `TTS`: streaming audio, conversations, many requests at once.

    tts = misotts.load("tiny", backend="auto")       # attaches an Engine (see docs/engine.md)
    for chunk in tts.stream("Hello.", seed=1): ...    # Audio chunks; the first after 1 frame
    chat = tts.conversation()
    a = chat.say("Hi, how are you?", speaker=0)       # each turn joins the history ...
    b = chat.say("Fine, thanks.", speaker=1)          # ... and the next reuses its KV cache

Every function here takes the TTS first, so `misotts.api` only forwards to them.  Requests
from many threads or asyncio tasks share the TTS's engine; each stream decodes its audio with a
Mimi of its own (a copy that shares the codec's weights), so streams never wait on each other.
"""
from __future__ import annotations

import copy
import threading
import time
import weakref
from contextlib import contextmanager
from typing import AsyncIterator, Iterator

import torch

from misotts.runtime.engine import Engine, EngineConfig
from misotts.runtime.generate import max_frames_for
from misotts.runtime.prompt import Segment, check_audio_path, check_codes
from misotts.runtime.scheduler import Stream

BACKENDS = ("auto", "reference")


def attach_engine(tts, config: EngineConfig | dict | None = None, progress: bool = False) -> Engine:
    """Build the engine for tts.model (warm-up and, on CUDA, graph capture happen here)."""
    if isinstance(config, dict):
        config = EngineConfig(**config)
    tts.engine = Engine(tts.model, config, progress=progress)
    return tts.engine


def _engine(tts) -> Engine:
    engine = getattr(tts, "engine", None)
    if engine is None:
        raise RuntimeError("this TTS has no engine: load it with backend='auto' (or call serving.attach_engine)")
    return engine


def submit(tts, text: str, speaker: int = 0, context=(), max_audio_ms: float = 10_000, temperature: float = 0.9,
           topk: int = 50, seed: int = 0, stop_on_eos: bool = True) -> Stream:
    """Queue a generation and return its `Stream` of codes at once (iterate it, or `async for`)."""
    frames, mask = tts.prompt(text, speaker, context)
    return _engine(tts).submit(frames, mask, max_frames_for(max_audio_ms), temperature=temperature, topk=topk,
                               seed=seed, stop_on_eos=stop_on_eos)


def iter_codes(tts, text: str, speaker: int = 0, context=(), max_audio_ms: float = 10_000,
               temperature: float = 0.9, topk: int = 50, seed: int = 0, stop_on_eos: bool = True
               ) -> Iterator[torch.Tensor]:
    yield from submit(tts, text, speaker, context, max_audio_ms, temperature, topk, seed, stop_on_eos)


# ---- audio -----------------------------------------------------------------------------------
_spare_decoders: "weakref.WeakKeyDictionary[object, list]" = weakref.WeakKeyDictionary()
_spare_lock = threading.Lock()


@contextmanager
def mimi_decoder(codec):
    """A streaming decoder that no other stream uses: a Mimi sharing `codec`'s weights but with
    its own streaming state (Mimi keeps that state in its modules), reused across streams."""
    from misotts.runtime.codec import MimiCodec

    with _spare_lock:
        spares = _spare_decoders.setdefault(codec, [])
        mimi_codec = spares.pop() if spares else None
    if mimi_codec is None:
        shared = {id(t): t for t in (*codec.mimi.parameters(), *codec.mimi.buffers())}
        mimi_codec = MimiCodec(copy.deepcopy(codec.mimi, memo=shared))
    try:
        with mimi_codec.stream_decoder(batch_size=1) as decoder:
            yield decoder
    finally:
        with _spare_lock:
            spares.append(mimi_codec)


def _chunks(codes: Iterator[torch.Tensor], first_chunk_frames: int, chunk_frames: int):
    """Group frames: the first chunk after `first_chunk_frames`, then every `chunk_frames`."""
    if first_chunk_frames < 1 or chunk_frames < 1:
        raise ValueError(f"first_chunk_frames and chunk_frames must be >= 1, got {first_chunk_frames}, {chunk_frames}")
    pending, size = [], first_chunk_frames
    for frame in codes:
        pending.append(frame)
        if len(pending) == size:
            yield torch.stack(pending)
            pending, size = [], chunk_frames
    if pending:
        yield torch.stack(pending)


class _AudioMaker:
    """Codes chunks -> Audio chunks through one stream decoder, timing them in GenerationStats."""

    def __init__(self, tts, decoder, stats, request):
        self.tts, self.decoder, self.stats, self.request = tts, decoder, stats, request
        self.start = time.perf_counter()

    def __call__(self, codes: torch.Tensor):
        from misotts.api import SAMPLE_RATE, Audio, mimi_codes

        playable = mimi_codes(codes, self.tts.codec.cardinality).to(self.tts.device)
        pcm = torch.cat([self.decoder.decode_frame(c[None])[0] for c in playable])
        stats = self.stats
        stats.reused_positions = self.request.reused_positions  # prefix-cache hits of this request
        stats.computed_positions = self.request.computed_positions
        if stats.frames == 0:
            stats.first_audio_s = time.perf_counter() - self.start
        stats.frames += len(codes)
        stats.audio_s = stats.frames * self.tts.codec.frame_size / SAMPLE_RATE
        stats.total_s = time.perf_counter() - self.start
        return Audio(pcm.float().cpu(), SAMPLE_RATE, codes.cpu())


def stream(tts, text: str, speaker: int = 0, context=(), max_audio_ms: float = 10_000, temperature: float = 0.9,
           topk: int = 50, seed: int = 0, chunk_frames: int = 1, first_chunk_frames: int = 1,
           stop_on_eos: bool = True) -> Iterator:
    """`Audio` chunks as frames are made: the first after `first_chunk_frames` frames, then every
    `chunk_frames`.  Concatenated, they equal `generate()` with the same arguments.  Closing the
    iterator early cancels the request and frees its KV blocks."""
    from misotts.api import GenerationStats

    stats = tts.last_stats = GenerationStats()
    with mimi_decoder(tts.codec) as decoder:  # first: a codec that fails to load wastes no frames
        codes = submit(tts, text, speaker, context, max_audio_ms, temperature, topk, seed, stop_on_eos)
        make = _AudioMaker(tts, decoder, stats, codes.stats)
        try:
            for chunk in _chunks(iter(codes), first_chunk_frames, chunk_frames):
                yield make(chunk)
        finally:
            codes.cancel()


async def astream(tts, text: str, speaker: int = 0, context=(), max_audio_ms: float = 10_000,
                  temperature: float = 0.9, topk: int = 50, seed: int = 0, chunk_frames: int = 1,
                  first_chunk_frames: int = 1, stop_on_eos: bool = True) -> AsyncIterator:
    """`stream` for asyncio: `async for chunk in astream(tts, ...)`.  Cancelling the task
    cancels the request.  (Mimi decoding runs in the event loop's thread: ~ms per frame on a GPU.)"""
    from misotts.api import GenerationStats

    if first_chunk_frames < 1 or chunk_frames < 1:
        raise ValueError(f"first_chunk_frames and chunk_frames must be >= 1, got {first_chunk_frames}, {chunk_frames}")
    stats = tts.last_stats = GenerationStats()
    with mimi_decoder(tts.codec) as decoder:
        codes = submit(tts, text, speaker, context, max_audio_ms, temperature, topk, seed, stop_on_eos)
        make = _AudioMaker(tts, decoder, stats, codes.stats)
        pending, size = [], first_chunk_frames
        try:
            async for frame in codes:
                pending.append(frame)
                if len(pending) == size:
                    yield make(torch.stack(pending))
                    pending, size = [], chunk_frames
            if pending:
                yield make(torch.stack(pending))
        finally:
            codes.cancel()


def generate(tts, text: str, speaker: int = 0, context=(), max_audio_ms: float = 10_000, temperature: float = 0.9,
             topk: int = 50, seed: int = 0, stop_on_eos: bool = True):
    from misotts.api import SAMPLE_RATE, Audio

    chunks = list(stream(tts, text, speaker, context, max_audio_ms, temperature, topk, seed, chunk_frames=8,
                         stop_on_eos=stop_on_eos))
    if not chunks:
        n = tts.config.num_codebooks
        return Audio(torch.zeros(0), SAMPLE_RATE, torch.zeros(0, n, dtype=torch.long))
    return Audio(torch.cat([c.samples for c in chunks]), SAMPLE_RATE, torch.cat([c.codes for c in chunks]))


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
        from misotts.api import mimi_codes

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
        from misotts.api import SAMPLE_RATE, Audio

        chunks = list(self.stream(text, speaker, chunk_frames=kwargs.pop("chunk_frames", 8), **kwargs))
        if not chunks:
            return Audio(torch.zeros(0), SAMPLE_RATE, torch.zeros(0, self.tts.config.num_codebooks, dtype=torch.long))
        return Audio(torch.cat([c.samples for c in chunks]), SAMPLE_RATE, torch.cat([c.codes for c in chunks]))

    def say_codes(self, text: str, speaker: int = 0, **kwargs) -> torch.Tensor:
        """A turn's codes only (no audio decoding), added to the history."""
        if getattr(self.tts, "engine", None) is not None:
            request = submit(self.tts, text, speaker, list(self.history), **kwargs)
            codes, self.last_stats = request.codes(), request.stats
        else:
            codes = self.tts.generate_codes(text, speaker=speaker, context=list(self.history), **kwargs)
        self._remember(speaker, text, codes)
        return codes
