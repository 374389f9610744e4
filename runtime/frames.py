"""What a generation hands out, whichever backend makes it: a `Frame` per frame, and its stats."""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Iterator, NamedTuple, Protocol, runtime_checkable

import torch


class Frame(NamedTuple):
    """One generated frame."""

    codes: torch.Tensor  # [num_codebooks] int64, CPU
    audio: torch.Tensor | None  # [frame_size] float32 samples at 24 kHz (CPU) when the request asked for audio


@dataclass
class RequestStats:
    prompt_positions: int = 0
    reused_positions: int = 0  # prompt positions whose KV came from the prefix cache
    computed_positions: int = 0  # prompt positions prefilled
    frames: int = 0
    wait_s: float = 0.0  # queued for a lane and KV blocks (from submit to admission)
    first_frame_s: float = float("nan")  # from submit to the first frame's codes on the host
    total_s: float = float("nan")
    finish: str = ""  # "eos", "max_frames", "cancelled" or "error"
    # Where first audio goes: marks in seconds from submit, in the order a first frame passes them
    # (nan until reached).  wait_s: admitted; prompt written: its prefill is done (on a GPU, the
    # prefill's device time, measured by events, is counted here, not in the frame); first_frame_s:
    # the first frame's codes on the host; audio ready: its samples on the host (= the codes' mark
    # without audio); received: the caller took it from the stream.
    prompt_written_s: float = float("nan")
    audio_ready_s: float = float("nan")
    received_s: float = float("nan")

    def first_audio_ms(self) -> dict[str, float]:
        """The first frame's time from submit to the caller, in ms, split into queue, prefill,
        first_frame, audio_decode and hand_off: consecutive differences of the marks, so they sum
        to total (nan until the caller has the first frame)."""
        marks = [0.0, self.wait_s, self.prompt_written_s, self.first_frame_s, self.audio_ready_s,
                 self.received_s]
        names = ("queue", "prefill", "first_frame", "audio_decode", "hand_off")
        out = {name: (b - a) * 1e3 for name, a, b in zip(names, marks, marks[1:])}
        out["total"] = self.received_s * 1e3
        return out


@runtime_checkable
class FrameStream(Protocol):
    """A generation's frames as the engine hands them out (`engine.requests.Stream`): iterate or
    `async for` for a `Frame` per frame; `stats` fills in as it runs (prompt positions, reused and
    computed, timings); `cancel()` stops it; `codes()` waits for all and stacks them."""

    stats: RequestStats

    def __iter__(self) -> Iterator[Frame]: ...

    def __aiter__(self) -> AsyncIterator[Frame]: ...

    def cancel(self) -> None: ...

    def codes(self) -> torch.Tensor: ...


def stack_codes(codes: list[torch.Tensor], num_codebooks: int) -> torch.Tensor:
    """Frames' codes [num_codebooks] each -> [T, num_codebooks] (T = 0 when there are none)."""
    return torch.stack(codes) if codes else torch.zeros(0, num_codebooks, dtype=torch.long)


# Codebook 0 of a frame whose logits held a NaN or an infinity (broken weights or inputs): both
# backends mark the frame with it where the codes are made, and fail the request on reading it.
NONFINITE_CODE = -1


def frame_end(codes: torch.Tensor, frame: int, stop_on_eos: bool) -> FloatingPointError | str | None:
    """Whether frame `frame` (codes [n], just made) ends its generation instead of being handed
    out: the error of a frame marked non-finite, "eos" for an all-zero frame (end of speech, as in
    Sesame's reference) when stop_on_eos, else None.  The last rule is max_frames: that many
    handed out."""
    return frame_ends(codes[None], [frame], [stop_on_eos])[0]


def frame_ends(codes: torch.Tensor, frames: list[int], stop_on_eos: list[bool]) -> list:
    """`frame_end` for a batch of frames codes [b, n] (frame indices `frames`, each with its
    stop_on_eos), with two tensor ops for the whole batch: the one place these rules live (the
    engine's scheduler and the oracle loop both ask it)."""
    nonfinite = (codes[:, 0] == NONFINITE_CODE).tolist()
    silent = (~codes.any(1)).tolist()
    return [nonfinite_error(frame) if bad else "eos" if stop and quiet else None
            for bad, quiet, frame, stop in zip(nonfinite, silent, frames, stop_on_eos)]


def nonfinite_error(frame: int) -> FloatingPointError:
    return FloatingPointError(f"the model's logits were NaN or infinite at frame {frame}: its weights or "
                              f"inputs are broken (no codes can be sampled)")
