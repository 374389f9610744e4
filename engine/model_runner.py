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
few ops that differ between devices come from an op set (`ops.py`): `TorchOps` (the torch references,
made sync-free where the reference syncs) or `TritonOps` (the launchers in misotts.kernels).
"""
from __future__ import annotations

from itertools import accumulate
from typing import NamedTuple

import torch
import torch.nn.functional as F

from misotts.kernels import reference as ref

from misotts.runtime.config import TransformerConfig
from .kv_cache import PagedKV
from .ops import OpSet
from misotts.runtime.frames import NONFINITE_CODE
from misotts.runtime.model import CSMModel, rope_inv_freq
from misotts.runtime.prompt import audio_row_mask, write_audio_rows
from misotts.weights import quantize
from misotts.weights.quantize import QuantLinear


# The engine's sampler is the reference's per-lane one (`sample_topk_ref` = lane_sampling + race_noise
# + topk_race); decode_frame calls the three parts so that each runs once per frame where it can.


# ---- host-to-device without a sync --------------------------------------------------------------
def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without blocking the host: on CUDA through pinned memory and a
    non-blocking copy (a pageable copy would wait for every frame already queued on the stream;
    torch's pinned allocator keeps the buffer until the copy has run); elsewhere as it is."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


# ---- a prefill call's metadata ------------------------------------------------------------------
class PrefillChunk:
    """What every layer's prefill attention needs for a call over several sequences' chunks,
    packed one after another (made once per call, not once per layer).

    cu_seqlens [k + 1]: chunk offsets; context_lens [k]: each sequence's positions written after
    its chunk; block_table [k, width]: int32 views of one device tensor.  lengths, context_list:
    the same as Python ints (the torch reference loops over the sequences with them).
    """

    def __init__(self, meta: torch.Tensor, lengths: list[int], context_list: list[int]):
        k = len(lengths)
        self.cu_seqlens, self.context_lens = meta[:k + 1], meta[k + 1:2 * k + 1]
        self.block_table = meta[2 * k + 1:].view(k, -1)
        self.lengths, self.context_list = lengths, context_list

    @staticmethod
    def host_meta(cu_seqlens: list[int], context_list: list[int], blocks: list[list[int]], pad_block: int) -> list[int]:
        """The metadata as one list of ints: cu_seqlens, context_lens, the block tables padded
        with pad_block to one width."""
        width = max(1, max(len(b) for b in blocks))
        return [*cu_seqlens, *context_list, *(i for b in blocks for i in (*b, *[pad_block] * (width - len(b))))]


# ---- the batch state: everything a frame reads or writes ------------------------------------
class LaneSetup(NamedTuple):
    """A request taking a lane: its last prompt row, that row's position, its blocks, its
    sampling settings, and which row of the joining prefill call's last hidden states is its own
    (what a depth-only first frame starts from)."""

    lane: int
    row: torch.Tensor  # [n + 1] ids
    row_mask: torch.Tensor  # [n + 1] bool
    position: int
    blocks: list[int]
    seed: int
    temperature: float
    topk: int
    hidden_row: int = -1  # -1: no hidden state from a prefill (the lane's first frame must run its backbone)


class BatchState:
    """Per-lane device tensors for `max_batch` lanes; lanes 0..n-1 are the running requests.

    rows, row_mask [B, n+1]: the row each lane feeds the backbone next (the last prompt row,
    then its previous frame); positions [B]: that row's position; counter [B]: the frame's first
    RNG counter (frame index * num_codebooks); codes [B, n]: the frame just made; active [B]: 1 for
    a request's lane, 0 for a padding lane (whose position stays 0: its attention reads one position,
    not a context that grows every frame); hidden [B, D]: the backbone's last hidden state of a
    lane's last prompt row, from its prefill -- a frame whose lanes all just joined is the depth
    decoder alone, from these (`ModelRunner.decode_frame(n, backbone=False)`).
    """

    def __init__(self, max_batch: int, num_codebooks: int, max_blocks: int, scratch_block: int, device,
                 dim: int = 1, dtype=torch.float32):
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
        self.active = torch.zeros(b, dtype=torch.long, **z)
        self.hidden = torch.zeros(b, dim, dtype=dtype, **z)
        self.audio_row_mask = audio_row_mask(num_codebooks, device)
        self.scratch_block, self.device = scratch_block, torch.device(device)

    def lane_tensors(self):
        """What a lane carries from frame to frame (and a move takes along).  Not `hidden`: only a
        depth-only frame reads it, whose lanes all just joined, and a join sets it."""
        return (self.rows, self.row_mask, self.positions, self.block_tables, self.seed, self.counter,
                self.temperature, self.topk, self.codes, self.active)

    def set_lanes(self, setups: list[LaneSetup], hidden: torch.Tensor | None = None) -> None:
        """Requests take lanes: one host-to-device copy for all of them (no host sync on CUDA),
        then device scatters.  hidden [k, D]: the rows `setup.hidden_row` point into."""
        if not setups:
            return
        w, blocks = self.rows.shape[1], self.block_tables.shape[1]
        ints = torch.empty(len(setups), 5 + 2 * w + blocks, dtype=torch.long)
        temperature = torch.empty(len(setups), dtype=torch.float32)
        ints[:, 5 + 2 * w:] = self.scratch_block
        for i, s in enumerate(setups):
            ints[i, :5] = torch.tensor([s.lane, s.position, s.seed, s.topk, s.hidden_row])
            ints[i, 5:5 + w], ints[i, 5 + w:5 + 2 * w] = torch.as_tensor(s.row), torch.as_tensor(s.row_mask)
            ints[i, 5 + 2 * w:5 + 2 * w + len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.long)
            temperature[i] = s.temperature
        ints, temperature = to_device(ints, self.device), to_device(temperature, self.device)
        lanes = ints[:, 0]
        self.rows[lanes] = ints[:, 5:5 + w]
        self.row_mask[lanes] = ints[:, 5 + w:5 + 2 * w].bool()
        self.positions[lanes], self.seed[lanes], self.topk[lanes] = ints[:, 1], ints[:, 2], ints[:, 3]
        self.block_tables[lanes] = ints[:, 5 + 2 * w:].int()
        self.counter[lanes], self.active[lanes], self.temperature[lanes] = 0, 1, temperature
        with_hidden = [s.hidden_row >= 0 for s in setups]
        if any(with_hidden):
            if not all(with_hidden):
                raise ValueError("set_lanes: either every joining lane has a prefill hidden row or none")
            self.hidden[lanes] = hidden[ints[:, 4]]

    def set_lane(self, lane: int, row, row_mask, position: int, blocks: list[int], seed: int,
                 temperature: float, topk: int) -> None:
        row, row_mask = (torch.as_tensor(t).expand(self.rows.shape[1]) for t in (row, row_mask))
        self.set_lanes([LaneSetup(lane, row, row_mask, position, blocks, seed, temperature, topk)])

    def clear_lane(self, lane: int) -> None:
        """A padding lane: reads and writes only the scratch block, samples greedily (scalar fills
        only: nothing from the host)."""
        for t, value in ((self.rows, 0), (self.row_mask, False), (self.positions, 0), (self.block_tables, self.scratch_block),
                         (self.seed, 0), (self.counter, 0), (self.temperature, 0.0), (self.topk, 1), (self.active, 0)):
            t[lane] = value

    def move_lane(self, src: int, dst: int) -> None:
        for t in self.lane_tensors():
            t[dst] = t[src]


# ---- the model --------------------------------------------------------------------------------
@torch.no_grad()
def _fuse(*linears) -> torch.Tensor:
    """One weight for several bias-free linears of the same input, rows stacked.  The modules'
    weights become views of it, so the fused copy is the only copy (and CSMModel still works).
    Quantised linears fuse into one QuantLinear, the engine's weight object for them."""
    if isinstance(linears[0], QuantLinear):
        return quantize.fuse(linears)
    fused = torch.cat([l.weight for l in linears])
    start = 0
    for l in linears:
        rows = l.weight.shape[0]
        l.weight.data = fused[start:start + rows]
        start += rows
    return fused


def _weight(linear):
    """What the op sets take for a linear: its weight tensor, or the QuantLinear itself."""
    return linear if isinstance(linear, QuantLinear) else linear.weight


class _Stack:
    """One transformer's weights, fused: qkv [(H + 2K) d, D], gate_up [2F, D]."""

    def __init__(self, module, cfg: TransformerConfig):
        self.cfg = cfg
        self.qkv = [_fuse(l.attn.wq, l.attn.wk, l.attn.wv) for l in module.layers]
        self.wo = [_weight(l.attn.wo) for l in module.layers]
        self.gate_up = [_fuse(l.mlp.w_gate, l.mlp.w_up) for l in module.layers]
        self.down = [_weight(l.mlp.w_down) for l in module.layers]
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
    def __init__(self, model: CSMModel, ops: OpSet, max_batch: int, block_size: int, num_blocks: int | None = None,
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
        self.state = BatchState(self.max_batch, self.n, self.max_blocks, self.kv.scratch_block, self.device,
                                self.config.backbone.dim, self.dtype)

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
    def prefill_many(self, chunks: list[tuple]) -> torch.Tensor:
        """Write the KV of several sequences' prompt chunks in one backbone pass (varlen: the
        chunks' rows packed, `cu_seqlens` in the attention's metadata).  chunks: (frames, mask
        [T_i, n+1] (CPU), start_i, blocks_i) each -> the last hidden state of each chunk [k, D]
        (not final-normed; a device tensor, no sync): a chunk that ends its prompt hands it to
        that request's first frame (`LaneSetup.hidden_row`)."""
        lengths, starts = [c[0].shape[0] for c in chunks], [c[2] for c in chunks]
        cu = [0, *accumulate(lengths)]
        contexts = [s + n for s, n in zip(starts, lengths)]
        t, k, w = cu[-1], len(chunks), chunks[0][0].shape[1]
        ints = []  # every position, its chunk, each chunk's last row, then the attention's metadata
        for start, length in zip(starts, lengths):
            ints += range(start, start + length)
        for i, length in enumerate(lengths):
            ints += [i] * length
        ints += [end - 1 for end in cu[1:]]
        ints += PrefillChunk.host_meta(cu, contexts, [c[3] for c in chunks], self.kv.scratch_block)
        rows = torch.cat([torch.cat([f, m.long()], 1) for f, m, *_ in chunks]).long()
        # One host-to-device copy for the call (on CUDA each copy of host data stalls the host).
        packed = to_device(torch.cat([rows.flatten(), torch.tensor(ints, dtype=torch.long)]), self.device)
        rows, packed = packed[:t * w * 2].view(t, 2 * w), packed[t * w * 2:]
        frames, mask = rows[:, :w].contiguous(), rows[:, w:].bool()
        positions, seq_of_row, last_rows = packed[:t], packed[t:2 * t], packed[2 * t:2 * t + k]
        meta = packed[2 * t + k:].to(torch.int32)
        chunk = PrefillChunk(meta, lengths, contexts)
        tables = chunk.block_table.long()
        slots = tables[seq_of_row, positions // self.block_size] * self.block_size + positions % self.block_size
        x = self.ops.embed(frames, mask, self.text_table, self.audio_table)
        h = self._backbone(x, positions, slots, lambda q, k_cache, v_cache: self.ops.prefill_attention(
            q, k_cache, v_cache, chunk, self.bb.scale))
        return h[last_rows]

    def prefill(self, frames, mask, start: int, blocks: list[int]) -> torch.Tensor:
        """One sequence's chunk of prompt rows frames, mask [T, n+1] at positions start.. into the
        paged cache -> its last row's hidden state [D] (see `prefill_many`)."""
        return self.prefill_many([(frames, mask, start, blocks)])[0]

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
    def decode_frame(self, n: int, backbone: bool = True) -> None:
        """One frame for lanes 0..n-1.  backbone=False: every lane just joined and its prefill ran
        its row through the backbone (`BatchState.hidden`), so the frame is the codebook-0 head and
        the depth decoder alone: first audio reads the backbone once.  (A lane that joins running
        lanes runs its row again with them: their frame reads the backbone anyway.)"""
        st, bs = self.state, self.block_size
        positions, tables = st.positions[:n], st.block_tables[:n]
        if backbone:
            # Padding lanes stay at position 0 (see `active`); clamping keeps any read in bounds (real lanes never clamp).
            block_index = (positions // bs).clamp(max=self.max_blocks - 1)
            slots = tables.gather(1, block_index[:, None])[:, 0].long() * bs + positions % bs
            context_lens = (positions + 1).clamp(max=self.max_blocks * bs).to(torch.int32)
            x = self.ops.embed(st.rows[:n], st.row_mask[:n], self.text_table, self.audio_table)
            h = self._backbone(x, positions, slots, lambda q, k_cache, v_cache: self.ops.decode_attention(
                q, k_cache, v_cache, tables, context_lens, self.bb.scale))
        else:
            h = st.hidden[:n]
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
        write_audio_rows(codes, st.rows[:n], st.row_mask[:n], st.audio_row_mask)
        positions += st.active[:n]
        st.counter[:n] += self.n
