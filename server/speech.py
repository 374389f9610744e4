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
from misotts.runtime.audio import FRAME_MS
from misotts.runtime.params import GenerationParams, InvalidParam
from misotts.runtime.prompt import MAX_SPEAKER, Segment, mimi_codes, segment_positions, text_positions

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


# The fields that say how to speak, shared by POST /v1/audio/speech and the WebSocket's session.config.
SETTINGS = ("seed", "temperature", "topk", "max_audio_ms")
VOICE_FIELDS = ("voice", "context", *SETTINGS)


@dataclass
class SpeechRequest:
    input: str
    params: GenerationParams = field(default_factory=GenerationParams)  # speaker, seed, sampling, length
    response_format: str = "mp3"
    stream_format: str | None = "audio"  # None: one whole file
    speed: float = 1.0  # a pitch-preserving time stretch of the output (stretch.py)
    ignored: list = field(default_factory=list)  # fields accepted but not honoured (instructions)
    context: list = field(default_factory=list)  # Segments before the input (a voice's first)
    voice: str = ""

    @property
    def speaker(self) -> int:
        return self.params.speaker


def check_fields(body: dict, known) -> None:
    for name in body:
        if name not in known:
            raise bad_request(f"unknown field {name!r}", name, "unknown_parameter")


def parse_speech(body, voices, config, max_context_audio_s: float = MAX_CONTEXT_AUDIO_S,
                 aliases: dict | None = None) -> SpeechRequest:
    """The JSON body -> a SpeechRequest for a model of `config`; an ApiError (400 / 413) naming
    the first bad field.  Blocking (context audio is decoded, voices are read from disk): call it
    from a thread."""
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", None)
    check_fields(body, {"model", "input", "response_format", "speed", "stream_format", "instructions", "strict",
                        *VOICE_FIELDS})
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad_request("model is required: a string (any name: this server serves one model)", "model")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise bad_request("input is required: a non-empty string", "input")
    _check_unicode(text, "input")
    if len(text) > MAX_INPUT_CHARS:
        raise ApiError(413, f"input is {len(text)} characters; the limit is {MAX_INPUT_CHARS}", "input",
                       "input_too_long")
    req = SpeechRequest(input=text)
    fmt = body.get("response_format", "mp3")
    if fmt not in FORMATS:
        raise bad_request(f"response_format must be one of {', '.join(FORMATS)}, got {_show(fmt)}", "response_format")
    req.response_format = fmt
    stream = body.get("stream_format", "audio")
    if stream not in STREAM_FORMATS:
        raise bad_request(f"stream_format must be 'audio', 'sse' or 'none', got {_show(stream)}", "stream_format")
    req.stream_format = None if stream == "none" else stream
    parse_delivery(body, req)
    parse_voice_settings(body, voices, config, req, max_context_audio_s, aliases)
    return req


def parse_delivery(body: dict, req: SpeechRequest) -> None:
    """OpenAI's `speed` and `instructions` (with our `strict`) into `req`: shared by POST
    /v1/audio/speech and the WebSocket's session.config."""
    speed = body.get("speed", 1.0)
    if not _is_number(speed) or not 0.25 <= speed <= 4.0:
        raise bad_request(f"speed must be a number in 0.25..4.0, got {_show(speed)}", "speed")
    req.speed = float(speed)
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


def parse_voice_settings(body: dict, voices, config, req: SpeechRequest,
                         max_context_audio_s: float = MAX_CONTEXT_AUDIO_S, aliases: dict | None = None) -> None:
    """The voice, context and generation settings of `body` into `req`: GenerationParams checked
    against the model's config (its bounds, not ours), then the server's own limit on length."""
    _parse_voice(body.get("voice"), voices, req, aliases)
    try:
        req.params = req.params.replace(**{name: body[name] for name in SETTINGS if name in body}).validate(config)
    except InvalidParam as err:
        raise bad_request(str(err), err.param) from None
    if not FRAME_MS <= req.params.max_audio_ms <= MAX_AUDIO_MS:
        raise bad_request(f"max_audio_ms must be a number in {FRAME_MS}..{MAX_AUDIO_MS}, got "
                          f"{_show(req.params.max_audio_ms)}", "max_audio_ms")
    req.context = req.context + parse_context(body.get("context", []), max_context_audio_s)


def _parse_voice(voice, voices, req: SpeechRequest, aliases: dict | None = None) -> None:
    if voice is None:
        raise bad_request("voice is required: a speaker id, a registered voice or an OpenAI voice name", "voice")
    if _is_int(voice) or (isinstance(voice, str) and voice.isascii() and voice.isdigit()):
        too_long = isinstance(voice, str) and len(voice) > 9  # int() of a 5,000-digit string raises
        speaker = MAX_SPEAKER + 1 if too_long else int(voice)
        if not 0 <= speaker <= MAX_SPEAKER:
            raise bad_request(f"voice as a speaker id must be in 0..{MAX_SPEAKER}, got {_show(voice)}", "voice")
        req.params, req.voice = req.params.replace(speaker=speaker), str(speaker)
        return
    if isinstance(voice, dict) and isinstance(voice.get("id"), str):  # OpenAI's {"id": ...} form
        voice = voice["id"]
    if not isinstance(voice, str):
        raise bad_request(f"voice must be a string, got {type(voice).__name__}", "voice")
    # A built-in name is its speaker unless the server maps it to a registered voice (--voice-alias):
    # a registered voice can never take a built-in name by itself (the voice routes refuse those names).
    name = (aliases or {}).get(voice, voice)
    if voices is not None and name not in OPENAI_VOICES and (stored := voices.get(name)) is not None:
        req.params, req.voice = req.params.replace(speaker=stored.speaker), voice
        req.context = [stored.segment()]
        return
    if name in OPENAI_VOICES:
        req.params, req.voice = req.params.replace(speaker=OPENAI_VOICES.index(name)), voice
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

    def __init__(self, tts, req: SpeechRequest, turns: Turns):
        self.tts, self.req, self.turns = tts, req, turns
        self.fixed, self.history, self.index = list(req.context), [], 0
        self.stats: list = []  # each turn's stream's stats (prompt positions reused / computed), once it speaks

    def count(self, text: str) -> int:
        return text_positions(text, self.req.speaker, self.tts.tokenizer)

    def positions(self, segments) -> int:
        return sum(segment_positions(s, self.tts.tokenizer) for s in segments)

    async def say(self, text: str) -> AsyncIterator[Audio]:
        """One turn's audio chunks; what was made of it (all, or up to a cancel) joins the history."""
        req = self.req
        params, self.index = req.params.for_turn(self.index), self.index + 1
        room = self.turns.max_positions - 1 - self.count(text) - params.max_frames - self.positions(self.fixed)
        context = self.fixed + fit_history(self.history, lambda s: self.positions([s]), room)
        made = []
        stream = self.tts.astream(text, context=context, params=params, first_chunk_frames=first_chunk_frames(req),
                                  chunk_frames=CHUNK_FRAMES)
        try:  # aclosing: a turn stopped early cancels its engine request now, not when collected
            async with aclosing(stream):
                async for chunk in stream:
                    if not made:
                        self.stats.append(stream.stats)
                    made.append(chunk.codes)
                    yield chunk
        finally:
            if made:  # what was heard is what the next turn follows
                self.history.append(Segment(req.speaker, text, codes=mimi_codes(torch.cat(made))))


async def speak(speaker: Speaker) -> AsyncIterator[Audio]:
    """Audio chunks of the speaker's whole input: one turn per group of sentences that fits
    max_turn_tokens; each turn's stats join `speaker.stats` as it starts speaking."""
    req, turns = speaker.req, speaker.turns
    for text in split_turns(req.input, turns.max_turn_tokens, speaker.count):
        async with aclosing(speaker.say(text)) as turn:
            async for chunk in turn:
                yield chunk
