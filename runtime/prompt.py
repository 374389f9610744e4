"""Segments and the prompt layout: every backbone position is a row of 33 ints + 33 bools.

Columns 0..31 hold audio codes, column 32 a text token.  A text row masks only column 32; an
audio row masks columns 0..31 and leaves column 32 at 0.  A segment is its text rows
(``[speaker]text`` wrapped in BOS/EOS), then, if it has audio, one row per Mimi frame and one
all-zero audio row that ends the audio.  The prompt is the context segments followed by the
target's text rows.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Segment:
    """One turn of a conversation.

    audio: mono samples (tensor/array at 24 kHz, or a (samples, rate) tuple) or a WAV path;
    codes: Mimi codes [T, num_codebooks] instead of audio (skips encoding).
    """

    speaker: int
    text: str
    audio: object = None
    codes: torch.Tensor | None = None


MAX_SPEAKER = 65_535  # speaker ids are small integers written into the text ("[0]Hello")


def check_segment(segment: Segment) -> None:
    """A turn's speaker and text, checked before any tokenizing or encoding."""
    if not isinstance(segment, Segment):
        raise TypeError(f"context items must be misotts.Segment, got {type(segment).__name__}")
    check_speaker(segment.speaker)
    if not isinstance(segment.text, str):
        raise TypeError(f"segment text must be a string, got {type(segment.text).__name__}")


def check_speaker(speaker) -> None:
    if isinstance(speaker, bool) or not isinstance(speaker, numbers.Integral):
        raise TypeError(f"speaker must be an integer id, got {type(speaker).__name__} {str(speaker)[:40]!r}")
    if not 0 <= speaker <= MAX_SPEAKER:
        raise ValueError(f"speaker must be in 0..{MAX_SPEAKER}, got {str(speaker)[:40]}")


def text_rows(tokens: list[int], num_codebooks: int = 32):
    frames = torch.zeros(len(tokens), num_codebooks + 1, dtype=torch.long)
    mask = torch.zeros(len(tokens), num_codebooks + 1, dtype=torch.bool)
    frames[:, -1] = torch.tensor(tokens, dtype=torch.long)
    mask[:, -1] = True
    return frames, mask


def check_text_ids(ids, text_vocab_size: int) -> None:
    """Refuse a text id the model has no embedding row for (a tokenizer that does not match the
    model): the engine's lookup would clamp it to another token, the reference's would fail."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    bad = ids[(ids < 0) | (ids >= text_vocab_size)]
    if bad.numel():
        raise ValueError(f"text id {bad[0].item()} is outside the model's text vocabulary of {text_vocab_size} "
                         f"ids (0..{text_vocab_size - 1}): the tokenizer does not match this model")


def check_prompt_text_ids(frames: torch.Tensor, mask: torch.Tensor, text_vocab_size: int) -> None:
    """check_text_ids on the text column of prompt rows [S, n + 1] (where it is masked in)."""
    check_text_ids(frames[:, -1][mask[:, -1].bool()], text_vocab_size)


def check_prompt_audio_codes(frames: torch.Tensor, mask: torch.Tensor, audio_vocab_size: int) -> None:
    """Refuse an audio code outside the model's audio vocabulary in prompt rows [S, n + 1] (where
    masked in): the engine's embedding lookup would clamp it to another code."""
    codes = frames[:, :-1][mask[:, :-1].bool()]
    bad = codes[(codes < 0) | (codes >= audio_vocab_size)]
    if bad.numel():
        raise ValueError(f"audio code {bad[0].item()} is outside the model's audio vocabulary of {audio_vocab_size} "
                         f"codes (0..{audio_vocab_size - 1})")


def audio_rows(codes: torch.Tensor, end_of_audio: bool = True):
    """codes [T, n] -> frames, mask [T (+1), n + 1] on codes' device: the backbone rows of audio
    frames (every path that feeds frames back builds them with `write_audio_rows`); the extra
    all-zero row marks the end of a turn's audio."""
    t, n = codes.shape
    rows = t + int(end_of_audio)
    frames = torch.zeros(rows, n + 1, dtype=torch.long, device=codes.device)
    mask = torch.zeros(rows, n + 1, dtype=torch.bool, device=codes.device)
    write_audio_rows(codes, frames[:t], mask, audio_row_mask(n, codes.device))
    return frames, mask


def audio_row_mask(num_codebooks: int, device=None) -> torch.Tensor:
    """The mask [n + 1] of an audio row: the audio columns in, the text column out."""
    mask = torch.ones(num_codebooks + 1, dtype=torch.bool, device=device)
    mask[-1] = False
    return mask


def write_audio_rows(codes: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor, row_mask: torch.Tensor) -> None:
    """In place: rows frames, mask [T, n + 1] become the audio rows of codes [T, n] (the codes,
    text column 0; mask = row_mask, `audio_row_mask(n)`).  No allocation, no host value and no
    sync, so the engine's captured frame writes each lane's next row with it (mask may have more
    rows than codes: an end-of-audio row takes the same mask)."""
    n = codes.shape[1]
    frames[:, :n] = codes
    frames[:, n:].zero_()
    mask.copy_(row_mask.expand_as(mask))


def check_codes(codes: torch.Tensor, num_codebooks: int, vocab: int = 2048) -> torch.Tensor:
    codes = torch.as_tensor(codes)
    if codes.ndim != 2 or codes.shape[1] != num_codebooks:
        raise ValueError(f"segment codes must be [frames, {num_codebooks}], got {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"segment codes must be integers, got {codes.dtype}")
    codes = codes.long().cpu()  # before comparing: uint8 codes would wrap against 2048
    if codes.numel() and (codes.min() < 0 or codes.max() >= vocab):
        raise ValueError(f"segment codes must lie in 0..{vocab - 1}")
    return codes


def check_audio_path(audio) -> None:
    """A path given as segment audio must name a file (checked before any encoding)."""
    if isinstance(audio, (str, Path)) and not Path(audio).expanduser().is_file():
        raise FileNotFoundError(f"segment audio file not found: {audio}")


def segment_rows(segment: Segment, tokenizer, num_codebooks: int,
                 encode_audio: Callable[[object], torch.Tensor] | None, with_audio: bool = True,
                 text_vocab_size: int | None = None):
    check_segment(segment)
    tokens = tokenizer.encode(f"[{segment.speaker}]{segment.text}")
    if text_vocab_size is not None:  # before its audio is encoded
        check_text_ids(tokens, text_vocab_size)
    frames, mask = text_rows(tokens, num_codebooks)
    if not with_audio:
        return frames, mask
    if segment.audio is not None and segment.codes is not None:
        raise ValueError("give a segment audio or codes, not both")
    codes = segment.codes
    if segment.audio is not None:
        if encode_audio is None:
            raise ValueError("this model has no codec to encode segment audio; pass codes instead")
        check_audio_path(segment.audio)
        codes = encode_audio(segment.audio)
    if codes is None:
        return frames, mask
    a_frames, a_mask = audio_rows(check_codes(codes, num_codebooks))
    return torch.cat([frames, a_frames]), torch.cat([mask, a_mask])


def build_prompt(text: str, speaker: int, context, tokenizer, num_codebooks: int = 32,
                 encode_audio: Callable[[object], torch.Tensor] | None = None, text_vocab_size: int | None = None,
                 max_positions: int | None = None):
    """Context segments, then the target turn's text rows -> frames, mask [S, n + 1].

    text_vocab_size: refuse text ids outside the model's vocabulary (ValueError).
    max_positions: refuse a prompt longer than this (ValueError), measured before any audio is
    loaded or encoded (from its length and rate), so a huge context fails at once."""
    context = list(context or ())
    for segment in [*context, Segment(speaker, text)]:
        check_segment(segment)
    if max_positions is not None:
        check_prompt_size(text, speaker, context, tokenizer, max_positions)
    parts = [segment_rows(s, tokenizer, num_codebooks, encode_audio, text_vocab_size=text_vocab_size)
             for s in context or ()]
    parts.append(segment_rows(Segment(speaker, text), tokenizer, num_codebooks, None, with_audio=False,
                              text_vocab_size=text_vocab_size))
    frames, mask = zip(*parts)
    return torch.cat(frames), torch.cat(mask)


def text_positions(text: str, speaker: int, tokenizer) -> int:
    """Backbone positions of a turn's text rows ("[speaker]text" with BOS/EOS)."""
    return len(tokenizer.encode(f"[{speaker}]{text}"))


def audio_positions(segment: Segment) -> int:
    """Backbone positions of a segment's audio rows: one per Mimi frame and the row that ends the
    audio (0 without audio), counted from the codes' length or the audio's length and rate --
    nothing is loaded or encoded."""
    if segment.codes is not None:
        return len(segment.codes) + 1
    if segment.audio is None:
        return 0
    from .audio import audio_frames  # audio imports numpy; prompt stays light

    check_audio_path(segment.audio)
    return audio_frames(segment.audio) + 1


def segment_positions(segment: Segment, tokenizer) -> int:
    """Backbone positions `segment` takes in a prompt (what `segment_rows` would make)."""
    return text_positions(segment.text, segment.speaker, tokenizer) + audio_positions(segment)


def prompt_positions(text: str, speaker: int, context, tokenizer) -> int:
    """The length of `build_prompt(text, speaker, context, ...)` in rows, without building it."""
    return text_positions(text, speaker, tokenizer) + sum(segment_positions(s, tokenizer) for s in context)


def check_prompt_size(text: str, speaker: int, context: list, tokenizer, max_positions: int) -> None:
    """Refuse a prompt of more than max_positions rows, counted without encoding any audio."""
    positions = prompt_positions(text, speaker, context, tokenizer)
    if positions > max_positions:
        from .audio import audio_seconds

        audio_s = sum(audio_seconds(s.audio) for s in context if s.codes is None and s.audio is not None)
        turns = f"the text and {len(context)} context turn(s)" + (f" with {audio_s:.1f} s of context audio" if audio_s else "")
        raise ValueError(f"the prompt ({positions} positions: {turns if context else 'the text'}) fills the model's "
                         f"context window of {max_positions + 1} positions: shorten the text"
                         + (" or drop context turns" if context else ""))


def mimi_codes(codes: torch.Tensor, cardinality: int = 2048) -> torch.Tensor:
    """Codes Mimi can decode: the vocabulary's special ids (2048..2050) become 0, and so does the
    mark of a frame with non-finite logits (negative; that request fails, its neighbours decode on).

    A trained model does not emit them as audio codes; untrained weights can.  `Audio.codes`
    keeps what the model sampled.
    """
    return codes.masked_fill((codes >= cardinality) | (codes < 0), 0)
