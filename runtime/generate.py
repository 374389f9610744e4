"""The oracle frame loop (Sesame's generator) over the plain `CSMModel`: prompt -> Mimi codes,
one frame at a time.  It serves nobody -- the engine is the only way frames are made -- it is
what the tests (and the soak) hold the engine to, as transformers is the oracle above it.  And
`check_request`, which the engine runs on every submit.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .audio import FRAME_MS
from .frames import frame_end, stack_codes
from .model import CSMModel
from .params import GenerationParams
from .prompt import audio_rows, check_prompt_audio_codes, check_prompt_text_ids
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
        if isinstance(end := frame_end(codes[0], t, stop_on_eos), Exception):
            raise end
        if end:
            return
        yield codes[0]
        cur_frames, cur_mask = (rows[None] for rows in audio_rows(codes, end_of_audio=False))
        positions = positions[-1:] + 1


def generate_codes(model: CSMModel, frames, mask, max_frames: int, **kwargs) -> torch.Tensor:
    """All frames at once: codes [T, num_codebooks] (T may be 0 when the first frame is EOS)."""
    out = list(iter_frames(model, frames, mask, max_frames, **kwargs))
    n = model.config.num_codebooks
    return stack_codes(out, n)
