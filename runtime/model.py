"""The CSM model in plain torch: the reference math that every faster path must match.

Each op's math (RVQ embedding sum, RoPE, RMSNorm, SwiGLU, attention, top-k sampling) is written
once, in `misotts.kernels.reference`, beside the Triton kernels that implement it; this file
composes those ops into the model, and the engine (`engine/model_runner.py`) composes the same ones.

Parameter names (our canonical checkpoint layout; RoPE rotates halves, as in transformers):

    text_embeddings.weight                [text_vocab, D_bb]
    audio_embeddings.weight               [num_codebooks * audio_vocab, D_bb]   row = code + k * audio_vocab
    {backbone,decoder}.layers.N.attn_norm.weight, .mlp_norm.weight
    {backbone,decoder}.layers.N.attn.{wq,wk,wv,wo}.weight
    {backbone,decoder}.layers.N.mlp.{w_gate,w_up,w_down}.weight
    {backbone,decoder}.norm.weight
    codebook0_head.weight                 [audio_vocab, D_bb]
    projection.weight                     [D_dec, D_bb]
    audio_head                            [num_codebooks - 1, D_dec, audio_vocab]

Shapes in this file: B batch, S new positions, D model width, H heads, K kv heads, d head_dim.
The module holds no buffers, so it can be built on the meta device and loaded with
``load_state_dict(..., assign=True)``; caches are made by `setup_caches`.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from misotts.kernels import reference as ref
from misotts.kernels.reference import apply_rope, attention_ref, rmsnorm_ref, rvq_embed_ref, swiglu_ref

from .config import ModelConfig, TransformerConfig
from .frames import NONFINITE_CODE
from .sampling import sample_topk


def rope_inv_freq(cfg: TransformerConfig, device=None) -> torch.Tensor:
    """A transformer's RoPE inverse frequencies [d/2] in float32, Llama-3-scaled when configured."""
    s = cfg.rope_scaling
    return ref.rope_inv_freq(cfg.head_dim, cfg.rope_base, **(dataclasses.asdict(s) if s else {}), device=device)


def rope_cos_sin(cfg: TransformerConfig, positions: torch.Tensor, inv_freq: torch.Tensor | None = None):
    """cos, sin [S, d/2] of the transformer's RoPE angles at integer positions [S], for `apply_rope`
    (inv_freq: `rope_inv_freq(cfg)`, when already made)."""
    return ref.rope_cos_sin(positions, rope_inv_freq(cfg, positions.device) if inv_freq is None else inv_freq)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm_ref(x, self.weight, self.eps)[0]


class KVCache:
    """Contiguous per-layer cache: k, v [B, K, max_len, d]."""

    def __init__(self, batch: int, cfg: TransformerConfig, max_len: int, dtype, device):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, K, S, d] at positions [S]; return the cache up to the last position."""
        self.k[:, :, positions] = k
        self.v[:, :, positions] = v
        end = int(positions[-1]) + 1
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        d, h, kv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        self.wq = nn.Linear(cfg.dim, h * d, bias=False)
        self.wk = nn.Linear(cfg.dim, kv * d, bias=False)
        self.wv = nn.Linear(cfg.dim, kv * d, bias=False)
        self.wo = nn.Linear(h * d, cfg.dim, bias=False)

    def forward(self, x, positions, cos, sin, cache: KVCache):
        b, s, _ = x.shape
        c = self.cfg
        q = apply_rope(self.wq(x).view(b, s, c.n_heads, c.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(b, s, c.n_kv_heads, c.head_dim), cos, sin)
        v = self.wv(x).view(b, s, c.n_kv_heads, c.head_dim)
        keys, values = cache.update(positions, k.transpose(1, 2), v.transpose(1, 2))
        # Causal by position: query at p sees cached keys at 0..p (later slots may be stale).
        key_pos = torch.arange(keys.shape[2], device=x.device)
        allowed = key_pos[None, :] <= positions[:, None]
        out = attention_ref(q.transpose(1, 2), keys, values, allowed)
        return self.wo(out.transpose(1, 2).reshape(b, s, c.n_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w_down(swiglu_ref(self.w_gate(x), self.w_up(x)))


class Layer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, positions, cos, sin, cache):
        x = x + self.attn(self.attn_norm(x), positions, cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Llama-style decoder stack; returns the final-normed hidden states."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.caches: list[KVCache] = []
        self.inv_freq: torch.Tensor | None = None

    def setup_caches(self, batch: int, max_len: int, dtype, device):
        self.caches = [KVCache(batch, self.cfg, max_len, dtype, device) for _ in self.layers]
        self.inv_freq = rope_inv_freq(self.cfg, device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], positions [S] (shared by the batch) -> hidden [B, S, D]."""
        if not self.caches:
            raise RuntimeError("call setup_caches() before running the transformer")
        cos, sin = rope_cos_sin(self.cfg, positions, self.inv_freq)
        for layer, cache in zip(self.layers, self.caches):
            x = layer(x, positions, cos, sin, cache)
        return self.norm(x)


class CSMModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        bb, dec = config.backbone, config.decoder
        self.text_embeddings = nn.Embedding(config.text_vocab_size, bb.dim)
        self.audio_embeddings = nn.Embedding(config.audio_vocab_size * config.num_codebooks, bb.dim)
        self.backbone = Transformer(bb)
        self.codebook0_head = nn.Linear(bb.dim, config.audio_vocab_size, bias=False)
        self.projection = nn.Linear(bb.dim, dec.dim, bias=False)
        self.decoder = Transformer(dec)
        self.audio_head = nn.Parameter(torch.empty(config.num_codebooks - 1, dec.dim, config.audio_vocab_size))

    def setup_caches(self, batch: int = 1, max_seq_len: int | None = None):
        p = self.text_embeddings.weight
        self.backbone.setup_caches(batch, max_seq_len or self.config.max_seq_len, p.dtype, p.device)
        self.decoder.setup_caches(batch, self.config.num_codebooks + 1, p.dtype, p.device)

    # ---- embeddings ----------------------------------------------------------------------
    def embed_audio(self, codebook: int, codes: torch.Tensor) -> torch.Tensor:
        return self.audio_embeddings(codes + codebook * self.config.audio_vocab_size)

    def embed_frames(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """frames, mask [B, S, 33] -> [B, S, D]: sum of the masked columns' embeddings."""
        return rvq_embed_ref(frames, mask, self.text_embeddings.weight, self.audio_embeddings.weight)

    # ---- the two stages of a frame -------------------------------------------------------
    def backbone_forward(self, frames, mask, positions) -> torch.Tensor:
        """Run the backbone over new positions; returns the normed hidden states [B, S, D_bb]."""
        return self.backbone(self.embed_frames(frames, mask), positions)

    def depth_logits(self, h: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced depth decoder: h [B, D_bb], codes [B, n] -> logits [B, n-1, vocab]
        for codebooks 1..n-1, where codebook i sees h and codes 0..i-1."""
        n = self.config.num_codebooks
        embeds = [self.embed_audio(i, codes[:, i]) for i in range(n - 1)]
        inputs = self.projection(torch.stack([h] + embeds, dim=1))  # [B, n, D_dec]
        self.decoder.setup_caches(h.shape[0], n + 1, h.dtype, h.device)
        out = self.decoder(inputs, torch.arange(n, device=h.device))  # [B, n, D_dec]
        return torch.einsum("bid,idv->biv", out[:, 1:], self.audio_head)

    @torch.inference_mode()
    def generate_frame(self, frames, mask, positions, temperature: float, topk: int,
                       seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
        """One audio frame: backbone over the new positions, then 31 depth steps.

        seed, counter: int64 [B]; sampling event i of this frame uses counter + i.
        Returns codes [B, num_codebooks]; codebook 0 is NONFINITE_CODE where a logit was NaN or infinite.
        """
        n = self.config.num_codebooks
        h = self.backbone_forward(frames, mask, positions)[:, -1]
        logits = self.codebook0_head(h)
        c0, checksum = sample_topk(logits, temperature, topk, seed, counter), logits.sum(-1)
        codes = [c0]
        step_input = torch.stack([h, self.embed_audio(0, c0)], dim=1)  # positions 0 and 1
        pos = torch.arange(2, device=h.device)
        for i in range(1, n):
            dec_h = self.decoder(self.projection(step_input), pos)[:, -1]
            logits = dec_h @ self.audio_head[i - 1]
            ci = sample_topk(logits, temperature, topk, seed, counter + i)
            checksum = checksum + logits.sum(-1)
            codes.append(ci)
            step_input = self.embed_audio(i, ci)[:, None]
            pos = pos[-1:] + 1
        codes = torch.stack(codes, dim=1)
        # A NaN or infinite logit marks the frame (codebook 0 = NONFINITE_CODE) as the engine does.
        codes[:, 0].masked_fill_(~torch.isfinite(checksum), NONFINITE_CODE)
        return codes
