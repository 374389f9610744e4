"""The reference frame loop (Sesame's generator): prompt -> Mimi codes, one frame at a time."""
from __future__ import annotations

from typing import Iterator

import torch

from .model import CSMModel
from .prompt import check_prompt_text_ids
from .sampling import check_sampling_args

FRAME_MS = 80  # one Mimi frame: 1920 samples at 24 kHz


def max_frames_for(max_audio_ms: float) -> int:
    if not max_audio_ms > 0:
        raise ValueError(f"max_audio_ms must be > 0, got {max_audio_ms}")
    return max(1, int(max_audio_ms // FRAME_MS))


def check_context_window(prompt_len: int, max_frames: int, max_seq_len: int) -> None:
    if prompt_len + max_frames > max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len} positions) + generation ({max_frames} frames) exceeds the model's "
            f"context window of {max_seq_len} positions: shorten the context or lower max_audio_ms "
            f"(at most {max(0, max_seq_len - prompt_len) * FRAME_MS} ms fit after this prompt)"
        )


def iter_frames(model: CSMModel, frames: torch.Tensor, mask: torch.Tensor, max_frames: int,
                temperature: float = 0.9, topk: int = 50, seed: int = 0,
                stop_on_eos: bool = True) -> Iterator[torch.Tensor]:
    """Yield codes [num_codebooks] per frame until an all-zero (end-of-speech) frame or max_frames.

    frames, mask: the prompt [S, n + 1].  The EOS frame itself is not yielded.  Unlike
    transformers (which checks codebooks 0..n-2), end of speech is all n codes zero, as in
    Sesame's reference.  Frame t draws its random numbers from counters t*n .. t*n + n - 1.
    """
    cfg = model.config
    check_sampling_args(temperature, topk, cfg.audio_vocab_size)
    check_context_window(frames.shape[0], max_frames, cfg.max_seq_len)
    check_prompt_text_ids(frames, mask, cfg.text_vocab_size)
    device = model.audio_head.device
    n = cfg.num_codebooks
    model.setup_caches(1, frames.shape[0] + max_frames)
    seed_t = torch.tensor([seed], dtype=torch.long, device=device)
    cur_frames, cur_mask = frames[None].to(device), mask[None].to(device)
    positions = torch.arange(frames.shape[0], device=device)
    audio_mask = torch.ones(1, 1, n + 1, dtype=torch.bool, device=device)
    audio_mask[..., -1] = False
    for t in range(max_frames):
        counter = torch.tensor([t * n], dtype=torch.long, device=device)
        codes = model.generate_frame(cur_frames, cur_mask, positions, temperature, topk, seed_t, counter)
        if stop_on_eos and not codes.any():
            return
        yield codes[0]
        cur_frames = torch.cat([codes, codes.new_zeros(1, 1)], dim=1)[:, None]
        cur_mask = audio_mask
        positions = positions[-1:] + 1


def generate_codes(model: CSMModel, frames, mask, max_frames: int, **kwargs) -> torch.Tensor:
    """All frames at once: codes [T, num_codebooks] (T may be 0 when the first frame is EOS)."""
    out = list(iter_frames(model, frames, mask, max_frames, **kwargs))
    n = model.config.num_codebooks
    return torch.stack(out) if out else torch.zeros(0, n, dtype=torch.long)
