"""CSMModel's math re-expressed for the engine: a paged backbone KV cache and static batches.

`ModelRunner` takes a `CSMModel`'s parameters (shared, not copied) plus a few precomputed ones:
fused qkv and gate_up weights, and `projection(audio_embeddings)` so that a depth step's next
input is a table row.  Two entry points:

- `prefill(...)`: one sequence's chunk of prompt rows into the paged cache (eager, any length);
- `decode_frame(state, n)`: one frame for lanes 0..n-1 of a `BatchState` -- the backbone over
  each lane's pending row, codebook 0, the 31 depth steps with sampling -- reading and writing
  only preallocated tensors, with shapes that depend on n alone, no host sync and no Python
  branch on tensor values, so it can be captured as a CUDA graph per batch size.

The math is `misotts.kernels.reference`'s, as in CSMModel; one layer loop (`_layers`) serves the
backbone's prefill and decode and the depth decoder, which differ only in their attention.  The
few ops that differ between devices come from an op set: `TorchOps` (the torch references,
made sync-free where the reference syncs) or `TritonOps` (the launchers in misotts.kernels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from misotts.kernels import reference as ref

from misotts.runtime.config import TransformerConfig
from .kv_cache import PagedKV
from misotts.runtime.frames import NONFINITE_CODE
from misotts.runtime.model import CSMModel, rope_inv_freq


# ---- op sets -----------------------------------------------------------------------------------
class TorchOps:
    name = "torch"

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

    @staticmethod
    def norm_linear(x, norm_weight, eps, weight):
        return ref.rmsnorm_linear_ref(x, norm_weight, eps, weight)

    @staticmethod
    def norm_swiglu(x, norm_weight, eps, gate_up):
        return ref.rmsnorm_swiglu_ref(x, norm_weight, eps, gate_up)

    @staticmethod
    def linear_add(a, weight, residual):
        return ref.linear_residual_ref(a, weight, residual)

    @staticmethod
    def depth_attention(qkv, cfg, k_cache, v_cache, pos, cos, sin, allowed, wo, residual):
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
        Gathers every lane's whole table (static shapes) and masks; no host sync."""
        tables = block_tables.long()
        keys = k_cache[tables].flatten(1, 2).transpose(1, 2)  # [N, K, max_blocks * block_size, d]
        values = v_cache[tables].flatten(1, 2).transpose(1, 2)
        allowed = (self._arange(keys.shape[2], q.device)[None, :] < context_lens[:, None])[:, None, None]
        return ref.attention_ref(q[:, :, None], keys, values, allowed, scale)[:, :, 0]

    @staticmethod
    def prefill_attention(q, k_cache, v_cache, chunk, scale):
        """q [T, H, d]: the last T of chunk.context_len positions of one sequence, causal."""
        n = chunk.context_len
        return ref.causal_attention_ref(q, ref.gather_kv(k_cache, chunk.block_table, n),
                                        ref.gather_kv(v_cache, chunk.block_table, n), scale)


class TritonOps:
    name = "triton"
    FUSED_ROWS = 16  # norm + GEMM in one launch up to this many rows (decode); cuBLAS above (prefill)

    def __init__(self):
        from misotts.kernels import (depth_attention, embedding, norm_linear, paged_attention, rmsnorm, rope,
                                     sampling, swiglu)

        self.k_embed, self.k_attn, self.k_norm, self.k_rope, self.k_swiglu = (
            embedding, paged_attention, rmsnorm, rope, swiglu)
        self.k_norm_linear, self.k_depth_attn, self.k_sampling = norm_linear, depth_attention, sampling

    def embed(self, frames, mask, text_table, audio_table):
        return self.k_embed.rvq_embed(frames[None].contiguous(), mask[None].contiguous(), text_table, audio_table)[0]

    def norm_linear(self, x, norm_weight, eps, weight):
        if x.shape[0] <= self.FUSED_ROWS:
            return self.k_norm_linear.norm_linear(x, norm_weight, eps, weight)
        return F.linear(self.k_norm.rmsnorm(x, norm_weight, eps)[0], weight)

    def norm_swiglu(self, x, norm_weight, eps, gate_up):
        if x.shape[0] <= self.FUSED_ROWS:
            return self.k_norm_linear.norm_linear(x, norm_weight, eps, gate_up, swiglu=True)
        return self.k_swiglu.swiglu(F.linear(self.k_norm.rmsnorm(x, norm_weight, eps)[0], gate_up))

    @staticmethod
    def linear_add(a, weight, residual):
        """residual += a @ weight.T in cuBLAS's epilogue (one launch; in place)."""
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
        return self.k_attn.paged_prefill(q, chunk.cu_seqlens, q.shape[0], k_cache, v_cache, chunk.block_table[None],
                                         chunk.context_lens, scale)


def make_ops(kind: str, device: torch.device):
    """"auto": Triton on CUDA, torch elsewhere; or "torch" / "triton" explicitly."""
    if kind == "auto":
        kind = "triton" if device.type == "cuda" else "torch"
    if kind == "torch":
        return TorchOps()
    if kind == "triton":
        return TritonOps()
    raise ValueError(f"unknown ops {kind!r}: expected 'auto', 'torch' or 'triton'")


# The engine's sampler is the reference's per-lane one (`sample_topk_ref` = lane_sampling + race_noise
# + topk_race); decode_frame calls the three parts so that each runs once per frame where it can.


# ---- a prefill call's metadata ------------------------------------------------------------------
class PrefillChunk:
    """What every layer's prefill attention needs, copied to the device once per call (one copy,
    not one per layer: on CUDA each host-to-device copy of pageable memory stalls the host).

    cu_seqlens [2] = (0, T), context_lens [1] = (start + T,), block_table [blocks]: int32 views
    of one device tensor; context_len: the same length as a Python int.
    """

    def __init__(self, meta: torch.Tensor, context_len: int):
        self.cu_seqlens, self.context_lens, self.block_table = meta[:2], meta[2:3], meta[3:]
        self.context_len = context_len

    @classmethod
    def make(cls, length: int, start: int, blocks: list[int], device) -> "PrefillChunk":
        meta = torch.tensor([0, length, start + length, *blocks], dtype=torch.int32)
        return cls(meta.to(device), start + length)


# ---- the batch state: everything a frame reads or writes ------------------------------------
class BatchState:
    """Per-lane device tensors for `max_batch` lanes; lanes 0..n-1 are the running requests.

    rows, row_mask [B, n+1]: the row each lane feeds the backbone next (the last prompt row,
    then its previous frame); positions [B]: that row's position; counter [B]: the frame's first
    RNG counter (frame index * num_codebooks); codes [B, n]: the frame just made.
    """

    def __init__(self, max_batch: int, num_codebooks: int, max_blocks: int, scratch_block: int, device):
        b, w = max_batch, num_codebooks + 1
        z = dict(device=device)
        self.rows = torch.zeros(b, w, dtype=torch.long, **z)
        self.row_mask = torch.zeros(b, w, dtype=torch.bool, **z)
        self.positions = torch.zeros(b, dtype=torch.long, **z)
        self.block_tables = torch.full((b, max_blocks), scratch_block, dtype=torch.int32, **z)
        self.seed = torch.zeros(b, dtype=torch.long, **z)
        self.counter = torch.zeros(b, dtype=torch.long, **z)
        self.temperature = torch.zeros(b, dtype=torch.float32, **z)
        self.topk = torch.ones(b, dtype=torch.long, **z)
        self.codes = torch.zeros(b, num_codebooks, dtype=torch.long, **z)
        self.audio_row_mask = torch.ones(w, dtype=torch.bool, **z)
        self.audio_row_mask[-1] = False
        self.scratch_block = scratch_block

    def lane_tensors(self):
        return (self.rows, self.row_mask, self.positions, self.block_tables, self.seed, self.counter,
                self.temperature, self.topk, self.codes)

    def set_lane(self, lane: int, row, row_mask, position: int, blocks: list[int], seed: int,
                 temperature: float, topk: int) -> None:
        self.rows[lane] = row
        self.row_mask[lane] = row_mask
        self.positions[lane] = position
        table = torch.full((self.block_tables.shape[1],), self.scratch_block, dtype=torch.int32)
        table[:len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.block_tables[lane] = table
        self.seed[lane], self.counter[lane] = seed, 0
        self.temperature[lane], self.topk[lane] = temperature, topk

    def clear_lane(self, lane: int) -> None:
        """A padding lane: reads and writes only the scratch block, samples greedily."""
        self.set_lane(lane, 0, False, 0, [], 0, 0.0, 1)

    def move_lane(self, src: int, dst: int) -> None:
        for t in self.lane_tensors():
            t[dst] = t[src]


# ---- the model --------------------------------------------------------------------------------
@torch.no_grad()
def _fuse(*linears) -> torch.Tensor:
    """One weight for several bias-free linears of the same input, rows stacked.  The modules'
    weights become views of it, so the fused copy is the only copy (and CSMModel still works)."""
    fused = torch.cat([l.weight for l in linears])
    start = 0
    for l in linears:
        rows = l.weight.shape[0]
        l.weight.data = fused[start:start + rows]
        start += rows
    return fused


class _Stack:
    """One transformer's weights, fused: qkv [(H + 2K) d, D], gate_up [2F, D]."""

    def __init__(self, module, cfg: TransformerConfig):
        self.cfg = cfg
        self.qkv = [_fuse(l.attn.wq, l.attn.wk, l.attn.wv) for l in module.layers]
        self.wo = [l.attn.wo.weight for l in module.layers]
        self.gate_up = [_fuse(l.mlp.w_gate, l.mlp.w_up) for l in module.layers]
        self.down = [l.mlp.w_down.weight for l in module.layers]
        self.attn_norm = [l.attn_norm.weight for l in module.layers]
        self.mlp_norm = [l.mlp_norm.weight for l in module.layers]
        self.norm = module.norm.weight
        self.q_dim, self.kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5

    def split_qkv(self, qkv):
        """[N, (H + 2K) d] -> q [N, H, d], k, v [N, K, d] (views)."""
        c = self.cfg
        q, k, v = qkv.split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        return (q.unflatten(-1, (c.n_heads, c.head_dim)), k.unflatten(-1, (c.n_kv_heads, c.head_dim)),
                v.unflatten(-1, (c.n_kv_heads, c.head_dim)))


class ModelRunner:
    def __init__(self, model: CSMModel, ops, max_batch: int, block_size: int, num_blocks: int | None = None,
                 compile: bool = False):
        cfg = self.config = model.config
        p = model.audio_head
        self.device, self.dtype, self.ops = p.device, p.dtype, ops
        self.n, self.vocab = cfg.num_codebooks, cfg.audio_vocab_size
        self.text_table, self.audio_table = model.text_embeddings.weight, model.audio_embeddings.weight
        self.bb, self.dec = _Stack(model.backbone, cfg.backbone), _Stack(model.decoder, cfg.decoder)
        self.c0_head, self.projection, self.audio_head = model.codebook0_head.weight, model.projection.weight, p
        with torch.inference_mode():
            # projection(audio_embeddings[c + k*V]) for every (k, c): a depth step's next input is a row.
            self.proj_table = torch.cat([F.linear(chunk, self.projection) for chunk in self.audio_table.split(8192)])
        self.bb_inv_freq = rope_inv_freq(cfg.backbone, self.device)
        self.max_batch, self.block_size = max_batch, block_size
        self.max_blocks = -(-cfg.max_seq_len // block_size)
        # Depth decoder: a contiguous cache per layer [B, K, n, d], reset (overwritten) each frame.
        d = cfg.decoder
        self.depth_k = torch.zeros(d.n_layers, max_batch, d.n_kv_heads, self.n, d.head_dim, dtype=self.dtype,
                                   device=self.device)
        self.depth_v = torch.zeros_like(self.depth_k)
        positions = torch.arange(self.n, device=self.device)
        self.depth_cos, self.depth_sin = ref.rope_cos_sin(positions, rope_inv_freq(d, self.device))
        self.depth_allowed = positions[None, :] <= positions[:, None]  # [query pos, key pos]
        self.depth_pos = [torch.tensor([i], device=self.device) for i in range(self.n)]
        self.depth_x = torch.zeros(max_batch, d.dim, dtype=self.dtype, device=self.device)  # the next input (Triton)
        self.logit_sums = torch.zeros(self.n, max_batch, dtype=torch.float32, device=self.device)  # NaN/inf check
        if compile:  # Inductor C++ for a depth step and its sampling: one graph per batch size, made on first use
            self._depth_sample = torch.compile(self._depth_sample, dynamic=False, fullgraph=True,
                                               options={"cpp_wrapper": True})
        if num_blocks is not None:
            self.allocate_kv(num_blocks)

    def allocate_kv(self, num_blocks: int) -> None:
        """The paged KV pool and the batch state (after the weights, so a pool sized from free
        memory sees what they took)."""
        self.kv = PagedKV(self.config.backbone, num_blocks, self.block_size, self.dtype, self.device)
        self.state = BatchState(self.max_batch, self.n, self.max_blocks, self.kv.scratch_block, self.device)

    def release(self) -> None:
        """Drop the KV pool and the batch state (the engine is closed; nothing runs a frame again)."""
        self.kv = self.state = None

    # ---- the layers: one loop for the backbone's prefill and decode and the depth decoder ----------
    def _layers(self, s: _Stack, x, attention):
        """The transformer s over rows x [T, D] -> the residual stream h [T, D] after its last layer,
        not yet final-normed: the callers' heads fuse that norm (`ops.norm_linear(h, s.norm, ...)`).
        attention(i, qkv, wo, h) is what differs between the callers: layer i's RoPE, KV write,
        attention over the fused projection qkv [T, (H + 2K) d], its output projection wo and the
        residual add -> the new h.  h may be updated in place (the Triton op set adds residuals in
        cuBLAS's epilogue, or in the depth attention kernel)."""
        ops, eps, h = self.ops, s.cfg.norm_eps, x
        for i in range(s.cfg.n_layers):
            qkv = ops.norm_linear(h, s.attn_norm[i], eps, s.qkv[i])
            h = attention(i, qkv, s.wo[i], h)
            h = ops.linear_add(ops.norm_swiglu(h, s.mlp_norm[i], eps, s.gate_up[i]), s.down[i], h)
        return h

    # ---- backbone ------------------------------------------------------------------------
    def _backbone(self, x, positions, slots, attend):
        """x [T, D] at positions [T] -> last hidden [T, D] (not final-normed); RoPE'd k and v are written
        to the paged cache at slots, then attend(q, k_cache, v_cache) -> [T, H, d] (prefill or decode)."""
        def attention(i, qkv, wo, h):
            q, k, v = self.bb.split_qkv(qkv)
            k_cache, v_cache = self.kv.layer(i)
            q = self.ops.rope_kv_write(q, k, v, positions, self.bb_inv_freq, k_cache, v_cache, slots)
            return self.ops.linear_add(attend(q, k_cache, v_cache).flatten(1), wo, h)

        return self._layers(self.bb, x, attention)

    @torch.inference_mode()
    def prefill(self, frames, mask, start: int, blocks: list[int]) -> None:
        """Write the KV of rows frames, mask [T, n+1] at positions start.. of the sequence whose
        blocks are `blocks` (eager; the hidden states are not needed)."""
        chunk = PrefillChunk.make(frames.shape[0], start, blocks, self.device)
        positions = torch.arange(start, chunk.context_len, device=self.device)
        slots = chunk.block_table[positions // self.block_size].long() * self.block_size + positions % self.block_size
        x = self.ops.embed(frames.to(self.device), mask.to(self.device), self.text_table, self.audio_table)
        self._backbone(x, positions, slots, lambda q, k_cache, v_cache: self.ops.prefill_attention(
            q, k_cache, v_cache, chunk, self.bb.scale))

    # ---- depth decoder ----------------------------------------------------------------------
    def _depth_step(self, x, pos, n: int):
        """The depth decoder at position pos (a tensor [1], so every step has the same shapes)
        for x [n, D']: writes its KV, attends to positions <= pos -> last hidden [n, D'] (not normed)."""
        def attention(i, qkv, wo, h):  # one position per lane: the lanes are the batch
            return self.ops.depth_attention(qkv, self.dec.cfg, self.depth_k[i, :n], self.depth_v[i, :n], pos,
                                            self.depth_cos, self.depth_sin, self.depth_allowed, wo, h)

        return self._layers(self.dec, x, attention)

    def _depth_sample(self, x, pos, n: int, head, frame, tokens, logit_sums):
        """Depth position pos (1..) for x [n, D'] -> its codebook's tokens (written to tokens [n]:
        logits = norm(h) @ head, the draw from `frame`'s per-lane settings) -> the next input.  The
        logits' sums go to logit_sums [n] (finite unless a logit is not)."""
        logits = self.ops.norm_linear(self._depth_step(x, pos, n), self.dec.norm, self.dec.cfg.norm_eps, head.t())
        torch.sum(logits, -1, dtype=torch.float32, out=logit_sums)
        return self.ops.sample(logits, pos, frame, self.proj_table, tokens, self.depth_x[:n])

    # ---- one frame for lanes 0..n-1 ------------------------------------------------------------
    @torch.inference_mode()
    def decode_frame(self, n: int) -> None:
        st, bs = self.state, self.block_size
        positions, tables = st.positions[:n], st.block_tables[:n]
        # Padding lanes count up forever; clamping keeps their reads in bounds (real lanes never clamp).
        block_index = (positions // bs).clamp(max=self.max_blocks - 1)
        slots = tables.gather(1, block_index[:, None])[:, 0].long() * bs + positions % bs
        context_lens = (positions + 1).clamp(max=self.max_blocks * bs).to(torch.int32)
        x = self.ops.embed(st.rows[:n], st.row_mask[:n], self.text_table, self.audio_table)
        h = self._backbone(x, positions, slots, lambda q, k_cache, v_cache: self.ops.decode_attention(
            q, k_cache, v_cache, tables, context_lens, self.bb.scale))
        codes, eps, sums = st.codes[:n], self.bb.cfg.norm_eps, self.logit_sums[:, :n]
        frame = self.ops.frame_sampling(st.temperature[:n], st.topk[:n], st.seed[:n], st.counter[:n], self.n,
                                        self.vocab)
        logits = self.ops.norm_linear(h, self.bb.norm, eps, self.c0_head)
        torch.sum(logits, -1, dtype=torch.float32, out=sums[0])
        x = self.ops.sample(logits, self.depth_pos[0], frame, self.proj_table, codes[:, 0], self.depth_x[:n])
        self._depth_step(self.ops.norm_linear(h, self.bb.norm, eps, self.projection), self.depth_pos[0], n)
        for i in range(1, self.n):
            x = self._depth_sample(x, self.depth_pos[i], n, self.audio_head[i - 1], frame, codes[:, i], sums[i])
        # A lane that met a NaN or infinite logit says so in its codes, read with them (no extra sync).
        codes[:, 0].masked_fill_(~torch.isfinite(sums).all(0), NONFINITE_CODE)
        # The frame becomes each lane's next backbone row.
        st.rows[:n, :self.n] = codes
        st.rows[:n, self.n].zero_()
        st.row_mask[:n] = st.audio_row_mask
        positions += 1
        st.counter[:n] += self.n
