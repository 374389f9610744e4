"""POST /v1/audio/speech: the request, checked field by field, and the generation behind it --
one turn, or for long input one turn per group of sentences, each conditioned on the turns before."""
from __future__ import annotations

import base64
import binascii
import math
import numbers
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from misotts.chunks import Audio
from misotts.runtime.prompt import MAX_SPEAKER, Segment, mimi_codes

from .audio_formats import FORMATS
from .audio_input import AudioTooLong, decode_capped
from .errors import ApiError, bad_request
from .limits import LIMITS
from .long_text import fit_history, split_turns

MAX_INPUT_CHARS = 4096  # as OpenAI
MAX_AUDIO_MS = 60_000  # per turn
# OpenAI's default is `audio` (the bytes as they are made); `none` is ours: one whole file.
STREAM_FORMATS = ("audio", "sse", "none")
# Every built-in voice name of OpenAI's SDK, so clients that check names against that list (Pipecat)
# or default to one get a speaker instead of a 400: speakers 0..12 in this order (the first 11
# kept the numbers they had before marin and cedar were added).
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")
FIRST_CHUNK_FRAMES, CHUNK_FRAMES = 1, 4  # the first audio leaves after one frame (80 ms), then every 320 ms
# Context audio a request may carry in all: what a 2,048-position window can hold (12.5 frames/s);
# create_app passes its model's.
MAX_CONTEXT_AUDIO_S = 2048 / 12.5
# mp3's and aac's encoders (their lookahead), flac's blocks and a time stretch (speed != 1, which
# needs a frame and its search window) give no audio back for one frame; for two they do (up to
# speed 2), so their first chunk is two frames: audio after 160 ms, not after the second chunk's 400.
LATE_FIRST_CHUNK_FRAMES = 2


def first_chunk_frames(req: "SpeechRequest") -> int:
    if req.speed == 1.0 and req.response_format in ("pcm", "wav", "opus"):
        return FIRST_CHUNK_FRAMES
    return LATE_FIRST_CHUNK_FRAMES


@dataclass
class SpeechRequest:
    input: str
    speaker: int
    response_format: str = "mp3"
    stream_format: str | None = "audio"  # None: one whole file
    speed: float = 1.0  # a pitch-preserving time stretch of the output (stretch.py)
    ignored: list = field(default_factory=list)  # fields accepted but not honoured (instructions)
    seed: int = 0
    temperature: float = 0.9
    topk: int = 50
    max_audio_ms: float = 10_000
    context: list = field(default_factory=list)  # Segments before the input (a voice's first)
    voice: str = ""


def parse_speech(body, voices, max_context_audio_s: float = MAX_CONTEXT_AUDIO_S,
                 aliases: dict | None = None) -> SpeechRequest:
    """The JSON body -> a SpeechRequest; an ApiError (400 / 413) naming the first bad field.
    Blocking (context audio is decoded, voices are read from disk): call it from a thread."""
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", None)
    known = {"model", "input", "voice", "response_format", "speed", "stream_format", "instructions", "seed",
             "temperature", "topk", "max_audio_ms", "context", "strict"}
    for name in body:
        if name not in known:
            raise bad_request(f"unknown field {name!r}", name, "unknown_parameter")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad_request("model is required: a string (any name: this server serves one model)", "model")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise bad_request("input is required: a non-empty string", "input")
    _check_unicode(text, "input")
    if len(text) > MAX_INPUT_CHARS:
        raise ApiError(413, f"input is {len(text)} characters; the limit is {MAX_INPUT_CHARS}", "input",
                       "input_too_long")
    req = SpeechRequest(input=text, speaker=0)
    _parse_voice(body.get("voice"), voices, req, aliases)
    fmt = body.get("response_format", "mp3")
    if fmt not in FORMATS:
        raise bad_request(f"response_format must be one of {', '.join(FORMATS)}, got {_show(fmt)}", "response_format")
    req.response_format = fmt
    speed = body.get("speed", 1.0)
    if not _is_number(speed) or not 0.25 <= speed <= 4.0:
        raise bad_request(f"speed must be a number in 0.25..4.0, got {_show(speed)}", "speed")
    req.speed = float(speed)
    stream = body.get("stream_format", "audio")
    if stream not in STREAM_FORMATS:
        raise bad_request(f"stream_format must be 'audio', 'sse' or 'none', got {_show(stream)}", "stream_format")
    req.stream_format = None if stream == "none" else stream
    strict = body.get("strict", False)
    if not isinstance(strict, bool):
        raise bad_request("strict must be true or false", "strict")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request("instructions must be a string", "instructions")
    if instructions:  # the model takes no instructions: ignored, and the reply says so, unless strict
        if strict:
            raise bad_request("instructions are not supported by this model (strict: true)", "instructions",
                              "unsupported_value")
        req.ignored.append("instructions")
    seed = body.get("seed", 0)
    if not _is_int(seed) or not 0 <= seed < 2**63 - 1024:  # turns use seed, seed + 1, ...
        raise bad_request(f"seed must be an integer in 0..2**63-1025, got {_show(seed)}", "seed")
    temperature = body.get("temperature", 0.9)
    if not _is_number(temperature) or not (temperature == 0 or 1e-4 <= temperature <= 1e4):
        raise bad_request(f"temperature must be 0 or in [1e-4, 1e4], got {_show(temperature)}", "temperature")
    topk = body.get("topk", 50)
    if not _is_int(topk) or not 1 <= topk <= 2051:
        raise bad_request(f"topk must be an integer in 1..2051, got {_show(topk)}", "topk")
    max_audio_ms = body.get("max_audio_ms", 10_000)
    if not _is_number(max_audio_ms) or not 80 <= max_audio_ms <= MAX_AUDIO_MS:
        raise bad_request(f"max_audio_ms must be a number in 80..{MAX_AUDIO_MS}, got {_show(max_audio_ms)}",
                          "max_audio_ms")
    req.seed, req.temperature, req.topk, req.max_audio_ms = int(seed), float(temperature), int(topk), float(max_audio_ms)
    req.context = req.context + parse_context(body.get("context", []), max_context_audio_s)
    return req


def _parse_voice(voice, voices, req: SpeechRequest, aliases: dict | None = None) -> None:
    if voice is None:
        raise bad_request("voice is required: a speaker id, a registered voice or an OpenAI voice name", "voice")
    if _is_int(voice) or (isinstance(voice, str) and voice.isascii() and voice.isdigit()):
        too_long = isinstance(voice, str) and len(voice) > 9  # int() of a 5,000-digit string raises
        speaker = MAX_SPEAKER + 1 if too_long else int(voice)
        if not 0 <= speaker <= MAX_SPEAKER:
            raise bad_request(f"voice as a speaker id must be in 0..{MAX_SPEAKER}, got {_show(voice)}", "voice")
        req.speaker, req.voice = speaker, str(speaker)
        return
    if isinstance(voice, dict) and isinstance(voice.get("id"), str):  # OpenAI's {"id": ...} form
        voice = voice["id"]
    if not isinstance(voice, str):
        raise bad_request(f"voice must be a string, got {type(voice).__name__}", "voice")
    # A built-in name is its speaker unless the server maps it to a registered voice (--voice-alias):
    # a registered voice can never take a built-in name by itself (the voice routes refuse those names).
    name = (aliases or {}).get(voice, voice)
    if voices is not None and name not in OPENAI_VOICES and (stored := voices.get(name)) is not None:
        req.speaker, req.voice = stored.speaker, voice
        req.context = [stored.segment()]
        return
    if name in OPENAI_VOICES:
        req.speaker, req.voice = OPENAI_VOICES.index(name), voice
        return
    raise bad_request(f"unknown voice {_show(voice)}: give a speaker id, a registered voice (GET /v1/audio/voices) "
                      f"or one of {', '.join(OPENAI_VOICES)}", "voice")


def parse_context(items, max_audio_s: float = MAX_CONTEXT_AUDIO_S) -> list[Segment]:
    """[{"speaker": int, "text": str, "codes": [[32 ints], ...] | "audio": base64 of an audio file}].
    The turns' audio is decoded up to max_audio_s in all, and refused past it."""
    if not isinstance(items, list):
        raise bad_request("context must be a list of turns", "context")
    segments, audio_left_s = [], max_audio_s
    for i, item in enumerate(items):
        param = f"context[{i}]"
        if not isinstance(item, dict):
            raise bad_request("each context turn must be an object", param)
        speaker, text = item.get("speaker", 0), item.get("text")
        if not _is_int(speaker) or not 0 <= speaker <= MAX_SPEAKER:
            raise bad_request(f"speaker must be an integer in 0..{MAX_SPEAKER}", f"{param}.speaker")
        if not isinstance(text, str):
            raise bad_request("text must be a string", f"{param}.text")
        _check_unicode(text, f"{param}.text")
        codes, audio = item.get("codes"), item.get("audio")
        if codes is not None and audio is not None:
            raise bad_request("give a turn codes or audio, not both", param)
        if codes is not None:
            try:
                codes = torch.tensor(codes)
            except (TypeError, ValueError, RuntimeError, OverflowError, RecursionError):
                raise bad_request("codes must be a list of frames, each a list of integers", f"{param}.codes")
            if (codes.dtype != torch.long or codes.ndim != 2 or codes.numel() == 0
                    or codes.min() < 0 or codes.max() >= 2048):
                raise bad_request("codes must be [frames][codebooks] integers in 0..2047", f"{param}.codes")
        if audio is not None:
            if isinstance(audio, str) and len(audio) > (LIMITS.max_audio_bytes + 2) // 3 * 4:
                raise ApiError(413, f"audio is over {LIMITS.max_audio_bytes} bytes", f"{param}.audio",
                               "file_too_large")
            try:
                audio = decode_capped(base64.b64decode(audio, validate=True), audio_left_s)
            except AudioTooLong:
                raise bad_request(f"the context's audio is longer than the context window holds "
                                  f"({max_audio_s:.0f} s in all)", f"{param}.audio", "audio_too_long") from None
            except (binascii.Error, TypeError, ValueError, OSError) as err:
                raise bad_request(f"audio must be a base64 audio file FFmpeg can read ({err})", f"{param}.audio")
            audio_left_s -= audio.numel() / 24_000
        segments.append(Segment(int(speaker), text, audio=audio, codes=codes))
    return segments


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer too large for a float
        return False


def _check_unicode(text: str, param: str) -> None:
    """JSON can carry lone surrogates ("\\ud800"), which no tokenizer or UTF-8 encoder takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("the text is not valid Unicode (a lone surrogate)", param) from None


def _show(x, limit: int = 60) -> str:
    """A client's value for an error message: short, and safe for any JSON value (a
    5,000-digit integer has no repr; a deep list's would recurse)."""
    if isinstance(x, (list, dict)):
        return f"a JSON {'array' if isinstance(x, list) else 'object'}"
    try:
        text = repr(x[:limit + 1] if isinstance(x, str) else x)
    except ValueError:
        return "an integer too long to show"
    return text if len(text) <= limit else text[:limit] + "..."


# ---- generation -------------------------------------------------------------------------------

@dataclass
class Turns:
    """How long input becomes turns: text budget per turn, and the positions kept for history."""

    max_turn_tokens: int  # text tokens of one turn
    max_positions: int  # the context window (the model's max_seq_len)

    @staticmethod
    def for_model(tts, max_turn_tokens: int | None = None) -> "Turns":
        window = tts.config.max_seq_len
        # an eighth of the window for a turn's text leaves room for its audio (12.5 frames/s) and the history
        return Turns(max_turn_tokens or window // 8, window)


class Speaker:
    """Turns in one voice, each spoken after the earlier ones (their text and the audio made for
    them), so the voice carries across the seams; the engine's prefix cache makes that history
    cheap.  The oldest generated turns slide out when the window fills; the request's own
    context (a voice, given turns) stays.  Turn i samples with seed + i."""

    def __init__(self, tts, req: SpeechRequest, turns: Turns, stats: list | None = None):
        self.tts, self.req, self.turns, self.stats = tts, req, turns, stats
        self.fixed, self.history, self.index = list(req.context), [], 0

    def count(self, text: str) -> int:
        return len(self.tts.tokenizer.encode(f"[{self.req.speaker}]{text}"))

    async def say(self, text: str) -> AsyncIterator[Audio]:
        """One turn's audio chunks; what was made of it (all, or up to a cancel) joins the history."""
        req, count = self.req, self.count
        seed, self.index = req.seed + self.index, self.index + 1
        room = (self.turns.max_positions - 1 - count(text) - math.ceil(req.max_audio_ms / 80)
                - _positions(self.fixed, count))
        context = self.fixed + fit_history(self.history, lambda s: _positions([s], count), room)
        made = []
        stream = self.tts.astream(text, req.speaker, context, max_audio_ms=req.max_audio_ms,
                                  temperature=req.temperature, topk=req.topk, seed=seed,
                                  first_chunk_frames=first_chunk_frames(req), chunk_frames=CHUNK_FRAMES)
        try:  # aclosing: a turn stopped early cancels its engine request now, not when collected
            async with aclosing(stream):
                async for chunk in stream:
                    if not made and self.stats is not None:
                        self.stats.append(self.tts.last_stats)
                    made.append(chunk.codes)
                    yield chunk
        finally:
            if made:  # what was heard is what the next turn follows
                self.history.append(Segment(req.speaker, text, codes=mimi_codes(torch.cat(made))))


async def speak(tts, req: SpeechRequest, turns: Turns, stats: list | None = None) -> AsyncIterator[Audio]:
    """Audio chunks of the whole input: one turn per group of sentences that fits max_turn_tokens.
    stats: each turn's GenerationStats is appended (its reused / computed prompt positions)."""
    speaker = Speaker(tts, req, turns, stats)
    for text in split_turns(req.input, turns.max_turn_tokens, speaker.count):
        async with aclosing(speaker.say(text)) as turn:
            async for chunk in turn:
                yield chunk


def _positions(segments, count) -> int:
    total = 0
    for s in segments:
        total += count(s.text)
        if s.codes is not None:
            total += len(s.codes) + 1
        elif s.audio is not None:
            total += math.ceil(len(s.audio) / 1920) + 1
    return total
