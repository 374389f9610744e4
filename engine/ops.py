"""The op sets: the few ops of a frame that differ between devices, behind one contract.

`OpSet` is the contract `ModelRunner` calls; `TorchOps` implements it with the torch references
of `misotts.kernels.reference` (made sync-free where the reference syncs; the CPU path and the
oracle for the engine's parity tests), `TritonOps` with the Triton launchers of `misotts.kernels`
(CUDA, or Triton's interpreter on the CPU).  `make_ops` picks one for a device.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from misotts.kernels import reference as ref
from misotts.weights.quantize import QuantLinear


@runtime_checkable
class OpSet(Protocol):
    """What a frame needs from an op set.  Shapes: x [N, D]; qkv [N, (H + 2K) d]; logits [N, V].

    `fused_rows`: up to this many rows, the norm + GEMM ops are one launch (the engine warms up the
    paths on either side of it); 0 where there is no such limit.
    """

    name: str
    fused_rows: int

    def embed(self, frames, mask, text_table, audio_table): ...
    def norm_linear(self, x, norm_weight, eps, weight): ...
    def norm_swiglu(self, x, norm_weight, eps, gate_up): ...
    def linear_add(self, a, weight, residual): ...
    def depth_attention(self, qkv, cfg, k_cache, v_cache, pos, cos, sin, allowed, wo, residual): ...
    def frame_sampling(self, temperature, topk, seed, counter, num_codebooks: int, vocab: int): ...
    def sample(self, logits, codebook, frame, table, tokens, next_input): ...
    def rope_kv_write(self, q, k, v, positions, inv_freq, k_cache, v_cache, slots): ...
    def decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, scale): ...
    def prefill_attention(self, q, k_cache, v_cache, chunk, scale): ...


# ---- op sets -----------------------------------------------------------------------------------
class TorchOps:
    name = "torch"
    fused_rows = 0

    def __init__(self):
        self._aranges = {}

    def _arange(self, length, device):
        # Made on the first (warm-up) call and kept: a frame's step creates no tensors from nothing.
        if (length, device) not in self._aranges:
            self._aranges[(length, device)] = torch.arange(length, device=device)
        return self._aranges[(length, device)]

    def embed(self, frames, mask, text_table, audio_table):
        """`rvq_embed_ref` for rows [N, n+1], with its codebook offsets from a kept arange."""
        n = frames.shape[-1] - 1
        offsets = self._arange(n, frames.device) * (audio_table.shape[0] // n)
        return ref.rvq_embed_ref(frames, mask, text_table, audio_table, offsets)

    # A weight is a tensor or a QuantLinear (weights/quantize.py), which does its own GEMM: the
    # plain model calls the same module, so the two stay equal bit for bit.
    @staticmethod
    def norm_linear(x, norm_weight, eps, weight):
        if isinstance(weight, QuantLinear):
            return weight(ref.rmsnorm_ref(x, norm_weight, eps)[0])
        return ref.rmsnorm_linear_ref(x, norm_weight, eps, weight)

    @staticmethod
    def norm_swiglu(x, norm_weight, eps, gate_up):
        if isinstance(gate_up, QuantLinear):
            return ref.swiglu_ref(gate_up(ref.rmsnorm_ref(x, norm_weight, eps)[0]))
        return ref.rmsnorm_swiglu_ref(x, norm_weight, eps, gate_up)

    @staticmethod
    def linear_add(a, weight, residual):
        if isinstance(weight, QuantLinear):
            return (weight(a).float() + residual.float()).to(residual.dtype)  # as linear_residual_ref
        return ref.linear_residual_ref(a, weight, residual)

    def depth_attention(self, qkv, cfg, k_cache, v_cache, pos, cos, sin, allowed, wo, residual):
        if isinstance(wo, QuantLinear):
            out = ref.depth_attention_ref(qkv, cfg.n_heads, cfg.n_kv_heads, k_cache, v_cache, pos, cos, sin, allowed)
            return self.linear_add(out.flatten(1), wo, residual)
        return ref.depth_attention_out_ref(qkv, cfg.n_heads, cfg.n_kv_heads, k_cache, v_cache, pos, cos, sin, wo,
                                           residual, allowed)

    def frame_sampling(self, temperature, topk, seed, counter, num_codebooks: int, vocab: int):
        """Once per frame: `lane_sampling`, and the race's noise for every codebook (codebook i
        draws with counter + i) -> [n, num_codebooks, V]."""
        device = seed.device
        noise = ref.race_noise(seed[:, None], counter[:, None] + self._arange(num_codebooks, device),
                               self._arange(vocab, device))
        return (*ref.lane_sampling(temperature, topk, vocab), noise)

    @staticmethod
    def sample(logits, codebook, frame, table, tokens, next_input):
        """Draw codebook c's tokens (c: int64 [1]) into tokens [n] -> the next input table[token + c V]
        (a new tensor; next_input is the Triton op set's buffer)."""
        greedy, divisor, kth, noise = frame
        token = ref.topk_race(logits, greedy, divisor, kth, noise.index_select(1, codebook)[:, 0])
        tokens.copy_(token)
        return table[token + codebook * logits.shape[1]]

    @staticmethod
    def rope_kv_write(q, k, v, positions, inv_freq, k_cache, v_cache, slots):
        # The reference write skips slot -1 with a boolean index (a host sync); the engine never
        # passes -1 (padding lanes write to the scratch block), so a plain index_copy_ does.
        k_cache.flatten(0, 1).index_copy_(0, slots, ref.rope_ref(k, positions, inv_freq))
        v_cache.flatten(0, 1).index_copy_(0, slots, v)
        return ref.rope_ref(q, positions, inv_freq)

    def decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, scale):
        """q [N, H, d]: each lane attends to its first context_lens[n] cached positions.
        Gathers every lane's whole table (static shapes) and masks; no host sync.  Positions past a
        lane's context are zeroed, not only masked: a freed block may still hold a past request's
        NaN, and a masked score or weight of 0 times NaN is NaN."""
        tables = block_tables.long()
        keys = k_cache[tables].flatten(1, 2).transpose(1, 2)  # [N, K, max_blocks * block_size, d]
        values = v_cache[tables].flatten(1, 2).transpose(1, 2)
        allowed = (self._arange(keys.shape[2], q.device)[None, :] < context_lens[:, None])[:, None, :, None]
        keys, values = keys.where(allowed, 0.0), values.where(allowed, 0.0)
        return ref.attention_ref(q[:, :, None], keys, values, allowed.transpose(2, 3), scale)[:, :, 0]

    @staticmethod
    def prefill_attention(q, k_cache, v_cache, chunk, scale):
        """q [T, H, d]: the chunks of chunk.lengths rows, one after another; each is the last rows
        of its sequence's chunk.context_list positions, causal."""
        out, start = [], 0
        for length, n, table in zip(chunk.lengths, chunk.context_list, chunk.block_table):
            out.append(ref.causal_attention_ref(q[start:start + length], ref.gather_kv(k_cache, table, n),
                                                ref.gather_kv(v_cache, table, n), scale))
            start += length
        return out[0] if len(out) == 1 else torch.cat(out)


class TritonOps:
    name = "triton"
    fused_rows = 64  # norm + GEMM in one launch up to this many rows (every decode bucket); cuBLAS above (prefill)

    def __init__(self, gemv_rows: int = 0):
        """gemv_rows: up to this many rows the output projections (wo, down) and their residual add run
        as the Triton GEMV `linear_add`; above it (and by default, until a GPU profile says the GEMV
        is faster: bench.kernels' linear_add rows) as cuBLAS's addmm_.  At most fused_rows."""
        from misotts.kernels import (depth_attention, embedding, norm_linear, paged_attention, rmsnorm, rope,
                                     sampling, swiglu)

        if not 0 <= gemv_rows <= self.fused_rows:
            raise ValueError(f"gemv_rows must be in 0..{self.fused_rows}, got {gemv_rows}")
        self.gemv_rows = gemv_rows

        self.k_embed, self.k_attn, self.k_norm, self.k_rope, self.k_swiglu = (
            embedding, paged_attention, rmsnorm, rope, swiglu)
        self.k_norm_linear, self.k_depth_attn, self.k_sampling = norm_linear, depth_attention, sampling

    def embed(self, frames, mask, text_table, audio_table):
        return self.k_embed.rvq_embed(frames[None].contiguous(), mask[None].contiguous(), text_table, audio_table)[0]

    def norm_linear(self, x, norm_weight, eps, weight):
        if x.shape[0] <= self.fused_rows:
            return self.k_norm_linear.norm_linear(x, norm_weight, eps, weight)
        return F.linear(self.k_norm.rmsnorm(x, norm_weight, eps)[0], weight)

    def norm_swiglu(self, x, norm_weight, eps, gate_up):
        if x.shape[0] <= self.fused_rows:
            return self.k_norm_linear.norm_linear(x, norm_weight, eps, gate_up, swiglu=True)
        return self.k_swiglu.swiglu(F.linear(self.k_norm.rmsnorm(x, norm_weight, eps)[0], gate_up))

    def linear_add(self, a, weight, residual):
        """residual += a @ weight.T in one launch, in place: the Triton GEMV up to gemv_rows rows,
        else in cuBLAS's epilogue."""
        if a.shape[0] <= self.gemv_rows:
            return self.k_norm_linear.linear_add(a, weight, residual)
        return residual.addmm_(a, weight.t())

    def depth_attention(self, qkv, cfg, k_cache, v_cache, pos, cos, sin, allowed, wo, residual):
        """RoPE, KV write, attention, wo and the residual add in one launch (residual in place)."""
        return self.k_depth_attn.depth_attention(qkv, cfg.n_heads, cfg.n_kv_heads, k_cache, v_cache, pos, cos, sin,
                                                 wo, residual)

    @staticmethod
    def frame_sampling(temperature, topk, seed, counter, num_codebooks: int, vocab: int):
        return temperature, topk, seed, counter  # the sampler kernel reads the lanes' settings itself

    def sample(self, logits, codebook, frame, table, tokens, next_input):
        return self.k_sampling.sample_next_input(logits, *frame, codebook, table, tokens, next_input)

    def rope_kv_write(self, q, k, v, positions, inv_freq, k_cache, v_cache, slots):
        return self.k_rope.rope_kv_write(q, k, v, positions, inv_freq, k_cache, v_cache, slots)

    def decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, scale):
        return self.k_attn.paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)

    def prefill_attention(self, q, k_cache, v_cache, chunk, scale):
        return self.k_attn.paged_prefill(q, chunk.cu_seqlens, max(chunk.lengths), k_cache, v_cache, chunk.block_table,
                                         chunk.context_lens, scale)


def make_ops(kind: str, device: torch.device, quantized: bool = False) -> OpSet:
    """"auto": Triton on CUDA, torch elsewhere; or "torch" / "triton" explicitly.  A model with
    quantised weights: "auto" is torch (the quantised Triton op set, engine/quant_ops.py, is
    chosen with "triton" until it has run on a GPU)."""
    if quantized and kind == "triton":
        from .quant_ops import QuantTritonOps

        return QuantTritonOps()
    if kind == "auto":
        kind = "triton" if device.type == "cuda" and not quantized else "torch"
    if kind == "torch":
        return TorchOps()
    if kind == "triton":
        return TritonOps()
    raise ValueError(f"unknown ops {kind!r}: expected 'auto', 'torch' or 'triton'")
