"""The reference frame loop (Sesame's generator): prompt -> Mimi codes, one frame at a time;
and `ReferenceBackend`, which offers it behind the engine's interface (`submit` -> a stream of frames).
"""
from __future__ import annotations

import asyncio
import threading
import time
from contextlib import nullcontext
from typing import Callable, Iterator

import torch

from .audio import FRAME_MS
from .frames import NONFINITE_CODE, Frame, RequestStats, nonfinite_error, stack_codes
from .model import CSMModel
from .prompt import audio_rows, check_prompt_audio_codes, check_prompt_text_ids, mimi_codes
from .params import GenerationParams
from .sampling import check_sampling_args, is_integer



def check_context_window(prompt_len: int, max_frames: int, max_seq_len: int) -> None:
    if prompt_len >= max_seq_len:  # the text (and context, if any) alone: no max_audio_ms helps
        raise ValueError(f"the prompt ({prompt_len} positions: the text, and context turns if any) fills the "
                         f"model's context window of {max_seq_len} positions: shorten the text or drop context turns")
    if prompt_len + max_frames > max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len} positions) + generation ({max_frames} frames) exceeds the model's "
            f"context window of {max_seq_len} positions: lower max_audio_ms, or shorten the prompt "
            f"(at most {max(0, max_seq_len - prompt_len) * FRAME_MS} ms fit after this prompt)"
        )


def check_request(cfg, frames, mask, params: GenerationParams) -> GenerationParams:
    """Everything about a request that can be refused before any work: nothing that passes here
    can fail in the engine's thread for being malformed.  Returns the validated params."""
    if not isinstance(params, GenerationParams):
        raise TypeError(f"params must be a GenerationParams, got {type(params).__name__}")
    params = params.validate(cfg)
    check_prompt(cfg, frames, mask, params.max_frames)
    return params


def check_prompt(cfg, frames, mask, max_frames: int) -> None:
    """Prompt rows frames, mask [S, n + 1] that a model of `cfg` can run, with room for max_frames."""
    if not isinstance(frames, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError(f"prompt frames and mask must be tensors, got {type(frames).__name__} and {type(mask).__name__}")
    if frames.dtype.is_floating_point or frames.dtype.is_complex:
        raise TypeError(f"prompt frames must be integer ids, got {frames.dtype}")
    if frames.ndim != 2 or frames.shape != mask.shape or frames.shape[1] != cfg.num_codebooks + 1 or not len(frames):
        raise ValueError(f"prompt frames and mask must both be [S >= 1, {cfg.num_codebooks + 1}], "
                         f"got {tuple(frames.shape)} and {tuple(mask.shape)}")
    if not is_integer(max_frames) or max_frames < 1:
        raise ValueError(f"max_frames must be an integer >= 1, got {max_frames!r}")
    check_context_window(frames.shape[0], max_frames, cfg.max_seq_len)
    frames, mask = frames.long().cpu(), mask.bool().cpu()
    check_prompt_text_ids(frames, mask, cfg.text_vocab_size)
    check_prompt_audio_codes(frames, mask, cfg.audio_vocab_size)


def iter_frames(model: CSMModel, frames: torch.Tensor, mask: torch.Tensor, max_frames: int,
                temperature: float = 0.9, topk: int = 50, seed: int = 0,
                stop_on_eos: bool = True) -> Iterator[torch.Tensor]:
    """Yield codes [num_codebooks] per frame until an all-zero (end-of-speech) frame or max_frames.

    frames, mask: the prompt [S, n + 1].  The EOS frame itself is not yielded.  Unlike
    transformers (which checks codebooks 0..n-2), end of speech is all n codes zero, as in
    Sesame's reference.  Frame t draws its random numbers from counters t*n .. t*n + n - 1.
    """
    cfg = model.config
    check_sampling_args(temperature, topk, cfg.audio_vocab_size, seed)
    check_prompt(cfg, frames, mask, max_frames)
    device = model.audio_head.device
    n = cfg.num_codebooks
    model.setup_caches(1, frames.shape[0] + max_frames)
    seed_t = torch.tensor([seed], dtype=torch.long, device=device)
    cur_frames, cur_mask = frames[None].to(device), mask[None].to(device)
    positions = torch.arange(frames.shape[0], device=device)
    for t in range(max_frames):
        counter = torch.tensor([t * n], dtype=torch.long, device=device)
        codes = model.generate_frame(cur_frames, cur_mask, positions, temperature, topk, seed_t, counter)
        if codes[0, 0] == NONFINITE_CODE:
            raise nonfinite_error(t)
        if stop_on_eos and not codes.any():
            return
        yield codes[0]
        cur_frames, cur_mask = (rows[None] for rows in audio_rows(codes, end_of_audio=False))
        positions = positions[-1:] + 1


def generate_codes(model: CSMModel, frames, mask, max_frames: int, **kwargs) -> torch.Tensor:
    """All frames at once: codes [T, num_codebooks] (T may be 0 when the first frame is EOS)."""
    out = list(iter_frames(model, frames, mask, max_frames, **kwargs))
    n = model.config.num_codebooks
    return stack_codes(out, n)


class ReferenceBackend:
    """The plain model behind the engine's interface: `submit` returns a stream of `Frame`s, made
    one at a time by `iter_frames` in the thread that reads the stream (audio, when asked for,
    decoded there by a streaming Mimi).  One stream at a time: the model holds its caches."""

    name = "reference"

    def __init__(self, model: CSMModel, codec: Callable[[], object] | None = None):
        self.model, self._codec = model, codec  # codec: makes the MimiCodec on first use
        self._busy = threading.Lock()

    def submit(self, frames: torch.Tensor, mask: torch.Tensor, params: GenerationParams,
               audio: bool = False) -> ReferenceStream:
        params = check_request(self.model.config, frames, mask, params)
        if audio and self._codec is None:
            raise ValueError("this backend has no codec to decode audio")
        return ReferenceStream(self, frames, mask, params.max_frames, dict(
            temperature=params.temperature, topk=params.topk, seed=params.seed, stop_on_eos=params.stop_on_eos), audio)

    def close(self) -> None:
        pass


_END = object()


class ReferenceStream:
    """`Stream`'s interface over the reference loop: iterate (or `async for`) for frames;
    `cancel()` / `close()`, `codes()`, `stats`."""

    def __init__(self, backend: ReferenceBackend, frames, mask, max_frames: int, sampling: dict, audio: bool):
        self.stats = RequestStats(prompt_positions=len(frames), computed_positions=len(frames))
        self._submitted = time.perf_counter()
        self._cancelled = False
        self._frames = self._run(backend, frames, mask, max_frames, sampling, audio)
        self._num_codebooks = backend.model.config.num_codebooks

    def _run(self, backend, frames, mask, max_frames, sampling, audio):
        if not backend._busy.acquire(blocking=False):
            raise RuntimeError("the reference backend runs one stream at a time: finish or close the other "
                               "stream first, or load with backend='auto' (the engine) for concurrent requests")
        stats = self.stats
        try:
            codec = backend._codec() if audio else None
            with codec.stream_decoder(batch_size=1) if audio else nullcontext() as decoder:
                for codes in iter_frames(backend.model, frames, mask, max_frames, **sampling):
                    if self._cancelled:
                        stats.finish = "cancelled"
                        return
                    samples = None
                    if audio:
                        samples = decoder.decode_frame(mimi_codes(codes[None], codec.cardinality))[0].float().cpu()
                    if stats.frames == 0:
                        stats.first_frame_s = time.perf_counter() - self._submitted
                    stats.frames += 1
                    yield Frame(codes.cpu(), samples)
            stats.finish = "max_frames" if stats.frames == max_frames else "eos"
        except GeneratorExit:  # closed by the reader
            stats.finish = "cancelled"
            raise
        except Exception:
            stats.finish = "error"
            raise
        finally:
            stats.total_s = time.perf_counter() - self._submitted
            backend._busy.release()

    def cancel(self) -> None:
        self._cancelled = True
        try:
            self._frames.close()  # runs the loop's cleanup now (frees the backend for the next stream)
        except ValueError:  # the loop is running in a worker thread (astream): it stops at its next frame
            pass

    close = cancel

    def __iter__(self):
        try:
            yield from self._frames
        finally:
            self.cancel()

    async def __aiter__(self):
        # Each frame is made in a worker thread, so the event loop keeps running meanwhile.
        loop = asyncio.get_running_loop()
        try:
            while (frame := await loop.run_in_executor(None, next, self._frames, _END)) is not _END:
                yield frame
        finally:
            self.cancel()

    def codes(self) -> torch.Tensor:
        return stack_codes([frame.codes for frame in self], self._num_codebooks)
