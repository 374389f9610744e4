"""The model's math, each op written once, in plain torch: the Triton kernels' oracle in the tests,
and what the plain model (runtime/model.py) and the engine (engine/ops.py: TorchOps, and the
depth decoder's RoPE and attention and the sampler on every device) are made of: RVQ embedding sum,
RoPE (frequencies, angles, rotation), attention, RMSNorm, SwiGLU, per-lane top-k sampling.

Same arguments as the launchers (minus scratch buffers); where the engine's captured frame step
needs it, an optional precomputed index tensor keeps them free of host syncs. They return new
tensors instead of writing in place, except `write_kv_ref`, which fills the caches it is given.
Math in fp32, or, for RMSNorm and SwiGLU, rounded where transformers' Llama rounds (the same in fp32).
"""
import math

import torch
import torch.nn.functional as F

from .rng import uniform


def rvq_embed_ref(frames, mask, text_table, audio_table, offsets=None):
    """frames [...,K+1] int, mask [...,K+1] bool -> [...,D] in the table dtype.

    Columns 0..K-1 are audio codes (codebook k's code c is row c + k*V of audio_table [K*V, D]),
    column K is a text token. The row embedding is the fp32 sum over the masked columns.
    offsets: optional int64 [K] = arange(K) * V, preallocated so that a captured step makes no tensor.
    """
    num_codebooks = frames.shape[-1] - 1
    audio_vocab = audio_table.shape[0] // num_codebooks
    if offsets is None:
        offsets = torch.arange(num_codebooks, device=frames.device) * audio_vocab
    rows = frames[..., :num_codebooks].long().clamp(0, audio_vocab - 1) + offsets
    audio = audio_table[rows].float() * mask[..., :num_codebooks, None]
    text = text_table[frames[..., -1].long().clamp(0, text_table.shape[0] - 1)].float() * mask[..., -1:]
    return (audio.sum(-2) + text).to(audio_table.dtype)


def rope_inv_freq(head_dim, base, factor=None, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=8192, device=None):
    """RoPE inverse frequencies [head_dim/2] fp32: base^(-2i/d), computed in float64, with
    Llama-3 scaling (transformers' "llama3" rope_type) unless factor is None (plain RoPE)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    if factor is None:
        return inv_freq.float()
    old_len = original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low_freq_factor, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= old_len / high_freq_factor) & (wavelen <= old_len / low_freq_factor)
    return torch.where(is_medium, smoothed, scaled).float()


def rope_cos_sin(positions, inv_freq):
    """cos, sin [T, d/2] of the angles position * inv_freq (fp32), for integer positions [T]."""
    angle = positions.float()[:, None] * inv_freq.float()[None, :]
    return angle.cos(), angle.sin()


def apply_rope(x, cos, sin):
    """x [..., T, H, d] rotated HF rotate_half style (pairs (i, i+d/2)) by cos/sin [T, d/2]; fp32 math."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rope_ref(x, positions, inv_freq):
    """x [T,H,d] rotated by the angles position * inv_freq (what the rope kernel computes)."""
    return apply_rope(x, *rope_cos_sin(positions, inv_freq))


def write_kv_ref(k, v, k_cache, v_cache, slot_mapping):
    """Write k/v [T,Hkv,d] into caches [blocks, block_size, Hkv, d] at slot_mapping (-1 = skip)."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots // block_size, slots % block_size] = k[keep].to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = v[keep].to(v_cache.dtype)


def rope_kv_write_ref(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping):
    """Rotated q (new tensor); rotated k and v written into the caches (in place)."""
    write_kv_ref(rope_ref(k, positions, inv_freq), v, k_cache, v_cache, slot_mapping)
    return rope_ref(q, positions, inv_freq)


def gather_kv(cache, block_table, length):
    """Contiguous [length, Hkv, d] view of one sequence's paged cache."""
    block_size = cache.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size].long()
    return cache[blocks].flatten(0, 1)[:length]


def attention_ref(q, k, v, allowed=None, scale=None):
    """Softmax attention, heads first: q [..., Hq, Tq, d], k/v [..., Hkv, Tk, d] (grouped-query when
    Hkv < Hq) -> [..., Hq, Tq, d]. allowed: bool broadcastable to [..., Hq, Tq, Tk] (True: the query
    may see the key) or None (all); scale: of the scores q.k, default d^-0.5."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                          enable_gqa=q.shape[-3] != k.shape[-3])


def causal_attention_ref(q, k, v, scale=None):
    """Tokens first: q [Tq,Hq,d] are the last Tq of the Tk positions whose k/v [Tk,Hkv,d] are given;
    query i sees keys 0..Tk-Tq+i."""
    tq, tk = q.shape[0], k.shape[0]
    allowed = torch.arange(tk, device=q.device)[None, :] <= torch.arange(tq, device=q.device)[:, None] + (tk - tq)
    return attention_ref(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), allowed, scale).transpose(0, 1)


def paged_decode_ref(q, k_cache, v_cache, block_tables, context_lens, scale):
    """q [N,Hq,d], one token per sequence attending to its context_lens[n] cached tokens (fp32 math)."""
    out = [causal_attention_ref(q[n:n + 1].float(), gather_kv(k_cache, block_tables[n], int(length)).float(),
                                gather_kv(v_cache, block_tables[n], int(length)).float(), scale)
           for n, length in enumerate(context_lens.tolist())]
    return torch.cat(out).to(q.dtype)


def paged_prefill_ref(q, cu_seqlens_q, k_cache, v_cache, block_tables, context_lens, scale):
    """q [T,Hq,d] packed chunks; chunk n (its k/v already cached) sees its prefix and itself, causally (fp32 math)."""
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for n, length in enumerate(context_lens.tolist()):
        start, end = cu[n], cu[n + 1]
        if end == start:
            continue
        k = gather_kv(k_cache, block_tables[n], length).float()
        v = gather_kv(v_cache, block_tables[n], length).float()
        out[start:end] = causal_attention_ref(q[start:end].float(), k, v, scale)
    return out


def rmsnorm_ref(x, weight, eps, residual=None):
    """Returns (weight * norm(h), h) with h = x + residual rounded to the residual dtype (or x).

    As transformers' LlamaRMSNorm: h / sqrt(mean(h^2) + eps) in fp32, rounded to h's dtype, then
    times weight (in fp32 that is plain fp32 math; the kernel rounds once, at the end)."""
    h = x if residual is None else (x.float() + residual.float()).to(residual.dtype)
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h


def swiglu_ref(gate, up=None):
    """silu(gate) * up [..., F] for gate, up [..., F], or for one fused gate_up [..., 2F] (gate
    first, up second) when up is None. Each op rounds to the input dtype, as transformers' LlamaMLP
    (in fp32 that is plain fp32 math; the kernel rounds once, at the end)."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return F.silu(gate) * up


def rmsnorm_linear_ref(x, norm_weight, eps, weight):
    """F.linear(rmsnorm(x), weight): x [N, K], norm_weight [K], weight [M, K] (any strides) -> [N, M]."""
    return F.linear(rmsnorm_ref(x, norm_weight, eps)[0], weight)


def rmsnorm_swiglu_ref(x, norm_weight, eps, gate_up):
    """swiglu(F.linear(rmsnorm(x), gate_up)): gate_up [2F, K] (gate rows first) -> [N, F]."""
    return swiglu_ref(rmsnorm_linear_ref(x, norm_weight, eps, gate_up))


def linear_residual_ref(a, weight, residual):
    """residual + F.linear(a, weight), added in fp32 and rounded to the residual's dtype (as
    `rmsnorm_ref` adds its residual): a [N, K], weight [M, K], residual [N, M] -> new [N, M]."""
    return (F.linear(a, weight).float() + residual.float()).to(residual.dtype)


def depth_attention_ref(qkv, n_heads, n_kv_heads, k_cache, v_cache, pos, cos, sin, allowed=None, scale=None):
    """One depth-decoder position for each of N lanes: RoPE, KV write and attention over <= P positions.

    qkv [N, (H + 2K) d] (q heads, then k, then v); k_cache, v_cache [N, K, P, d], written at
    position pos (int64 [1], a device tensor); cos, sin [P, d/2] fp32 tables of every position;
    allowed: optional bool [P, P] (query position, key position) = key <= query, precomputed.
    The rotated k and v go to the caches; the rotated q attends to positions 0..pos -> [N, H, d].
    Positions past pos are zeroed before attending, not only masked: they hold an earlier frame's
    values, perhaps a past request's NaN, and a masked score or weight of 0 times NaN is NaN."""
    head_dim = qkv.shape[-1] // (n_heads + 2 * n_kv_heads)
    q, k, v = qkv.unflatten(-1, (n_heads + 2 * n_kv_heads, head_dim)).split([n_heads, n_kv_heads, n_kv_heads], 1)
    c, s = cos[pos], sin[pos]
    if allowed is None:
        positions = torch.arange(k_cache.shape[2], device=qkv.device)
        allowed = positions[None, :] <= positions[:, None]
    k_cache.index_copy_(2, pos, apply_rope(k, c, s)[:, :, None])
    v_cache.index_copy_(2, pos, v[:, :, None])
    seen = allowed[pos][0, :, None]  # [P, 1]: positions 0..pos
    keys, values = k_cache.where(seen, 0.0), v_cache.where(seen, 0.0)
    return attention_ref(apply_rope(q, c, s)[:, :, None], keys, values, allowed[pos], scale)[:, :, 0]


def depth_attention_out_ref(qkv, n_heads, n_kv_heads, k_cache, v_cache, pos, cos, sin, wo, residual, allowed=None,
                            scale=None):
    """`depth_attention_ref` followed by the output projection wo [D, H d] and the residual add
    (`linear_residual_ref`) -> the new residual [N, D] (what the depth_attention kernel fuses)."""
    out = depth_attention_ref(qkv, n_heads, n_kv_heads, k_cache, v_cache, pos, cos, sin, allowed, scale)
    return linear_residual_ref(out.flatten(1), wo, residual)


def lane_sampling(temperature, topk, vocab: int):
    """What each lane's temperature [N] (fp32) and topk [N] (int) mean to `topk_race`:
    greedy [N] (temperature == 0 or topk == 1), divisor [N, 1] (the temperature; 1 on greedy lanes)
    and kth [N, 1], the rank of the k-th largest score (topk capped at the vocabulary).
    Separate so that the engine works them out once per frame, not once per codebook."""
    greedy = (temperature == 0) | (topk == 1)
    return greedy, torch.where(greedy, 1.0, temperature)[:, None], (topk.clamp(max=vocab) - 1)[:, None]


def race_noise(seed, counter, vocab):
    """The race's exponential noise -log(u), u = uniform(seed, counter, vocab): [..., V] fp32."""
    return -torch.log(uniform(seed, counter, vocab))


def topk_race(logits, greedy, divisor, kth, noise):
    """The draw, given `lane_sampling`'s greedy, divisor, kth and the lanes' `race_noise` [N, V].

    Greedy lanes: argmax of logits (lowest index on ties). Others: keep the scores logits/divisor
    >= the k-th largest (ties kept), softmax, and return argmax(probs / noise) (an exponential
    race: a draw from probs). Sorting finds each lane's k-th largest (torch.topk takes one k)."""
    x = logits.float()
    scores = x / divisor
    threshold = scores.sort(dim=-1, descending=True).values.gather(1, kth)
    probs = scores.masked_fill(scores < threshold, float("-inf")).softmax(-1)
    return torch.where(greedy, x.argmax(-1), (probs / noise).argmax(-1))


def sample_topk_ref(logits, temperature, topk, seed, counter, vocab_index=None):
    """Sesame's top-k sampler with the shared RNG: logits [N, V] -> int64 tokens [N].

    temperature, topk: per-lane tensors [N] (fp32, int), or numbers for every lane (made into
    such tensors here). Lane n draws from the stream (seed[n], counter[n]); see `topk_race`.
    vocab_index: optional arange(V), preallocated so that a captured step makes no tensor.
    """
    lanes, vocab = logits.shape
    if not isinstance(temperature, torch.Tensor):
        temperature = torch.full((lanes,), temperature, dtype=torch.float32, device=logits.device)
    if not isinstance(topk, torch.Tensor):
        topk = torch.full((lanes,), topk, dtype=torch.int64, device=logits.device)
    noise = race_noise(seed.to(logits.device), counter.to(logits.device), vocab if vocab_index is None else vocab_index)
    return topk_race(logits, *lane_sampling(temperature, topk, vocab), noise)


def depth_step_ref(h, head, codebook, embed_table, seed, counter, temperature, topk):
    """One depth-decoder step: (tokens [B], next_input [B,D'], logits [B,V] fp32).

    logits = h [B,D] @ head [D,V]; tokens sampled; next_input = embed_table[token + codebook*V].
    """
    logits = h.float() @ head.float()
    tokens = sample_topk_ref(logits, temperature, topk, seed, counter)
    return tokens, embed_table[tokens + codebook * head.shape[1]], logits


# ---- weight-only quantisation: the stored forms and what they mean ----------------------------
# A quantised linear weight [M, K] is stored as data + fp32 scales (weights/quantize.py makes them):
#   "int8": data int8 [M, K], scale [M]            w = data * scale[m]
#   "fp8":  data float8_e4m3fn [M, K], scale [M]   w = data * scale[m]
#   "int4": data uint8 [M, K/2], scale [M, K/g]    two codes a byte (column 2j in the low nibble,
#           2j+1 in the high one), each code = q + 8 for q in -8..7; w = q * scale[m, k // g]
# The reference is "dequantise, then the model dtype's math": the weight rebuilt in fp32, rounded
# once to the activations' dtype, then the plain F.linear.

def unpack_int4_ref(data):
    """uint8 [M, K/2] (two codes a byte, low nibble first) -> int8 [M, K] codes in -8..7."""
    codes = torch.stack([data & 0xF, data >> 4], dim=-1).flatten(-2)
    return codes.to(torch.int8) - 8


def dequantize_ref(data, scale, scheme, dtype):
    """The weight [M, K] in `dtype` that a stored (data, scale) means (see above)."""
    if scheme in ("int8", "fp8"):
        return (data.float() * scale.float()[:, None]).to(dtype)
    if scheme == "int4":
        codes = unpack_int4_ref(data).float()
        m, k = codes.shape
        groups = scale.shape[1]
        return (codes.view(m, groups, k // groups) * scale.float()[:, :, None]).view(m, k).to(dtype)
    raise ValueError(f"unknown quantisation scheme {scheme!r}")


def quant_linear_ref(x, data, scale, scheme):
    """F.linear(x, dequantize_ref(...)) in x's dtype: x [..., K] -> [..., M]."""
    return F.linear(x, dequantize_ref(data, scale, scheme, x.dtype))
