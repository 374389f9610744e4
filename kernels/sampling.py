"""Top-k sampling with the shared counter RNG, and the fused depth-decoder step built on it.

A depth-decoder step is two launches: a batched GEMV over vocab tiles (spread over many SMs), then
one program per sequence that finds the top-k threshold, draws the token, writes it into `codes`
and copies the next input embedding row. Fusing both would need a grid-wide barrier (top-k needs
every logit), so the step stays at two launches; both read only device tensors (seed, counter),
so a CUDA graph of the step replays with new randomness when the caller bumps `counter`.
"""
import torch
import triton
import triton.language as tl

from ._utils import FLOAT_DTYPES, INT_DTYPES, check, check_same_device, launch, next_pow2
from .rng import uniform_tl


@triton.jit
def _head_logits_kernel(h, head, logits, batch, dim, vocab, stride_hb, stride_hd, stride_wd, stride_wv, stride_lb,
                        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, IEEE: tl.constexpr):
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_B, BLOCK_V], tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(h + rows[:, None] * stride_hb + ks[None, :] * stride_hd,
                    mask=(rows < batch)[:, None] & (ks < dim)[None, :], other=0.0)
        w = tl.load(head + ks[:, None].to(tl.int64) * stride_wd + cols[None, :] * stride_wv,
                    mask=(ks < dim)[:, None] & (cols < vocab)[None, :], other=0.0)
        if IEEE:  # fp32 weights: no tf32, so greedy tokens match an fp32 reference
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    tl.store(logits + rows[:, None] * stride_lb + cols[None, :], acc,
             mask=(rows < batch)[:, None] & (cols < vocab)[None, :])


@triton.jit
def _sample_kernel(logits, stride_lb, vocab, temperature, topk, seed, counter, counter_offset, tokens, stride_tok,
                   embed_table, next_input, stride_next, embed_dim, row_offset, codebook,
                   GREEDY: tl.constexpr, PER_LANE: tl.constexpr, V_PAD: tl.constexpr, HAS_EMBED: tl.constexpr,
                   BLOCK_D: tl.constexpr, CODEBOOK_TENSOR: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    if CODEBOOK_TENSOR:  # the codebook comes from a device tensor [1]: one graph serves every codebook
        counter_offset = tl.load(codebook).to(tl.int64)
        row_offset = counter_offset * vocab
    idx = tl.arange(0, V_PAD)
    valid = idx < vocab
    x = tl.load(logits + b * stride_lb + idx, mask=valid, other=float("-inf")).to(tl.float32)
    token = tl.argmax(x, axis=0, tie_break_left=True)  # greedy: lowest index among the maxima
    if not GREEDY:
        if PER_LANE:  # per-lane sampling parameters (device tensors): greedy lanes keep the argmax
            temp, k = tl.load(temperature + b), tl.load(topk + b)
            greedy = (temp == 0).to(tl.int32) + (k == 1).to(tl.int32)
            temp = tl.where(greedy > 0, 1.0, temp)
        else:
            temp, k, greedy = temperature, topk, tl.zeros([], tl.int32)
        x = x / temp + 0.0  # + 0.0 turns -0.0 into +0.0 so the integer keys below order like floats
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone float -> int32 map
        # Bisect for the k-th largest key: the largest t with count(key >= t) >= k (ties all kept).
        k = tl.minimum(k, vocab)
        lo = tl.min(tl.where(valid, key, 0x7FFFFFFF), axis=0).to(tl.int64)
        hi = tl.max(tl.where(valid, key, -0x7FFFFFFF - 1), axis=0).to(tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            enough = tl.sum((valid & (key >= mid)).to(tl.int32), axis=0) >= k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        x = tl.where(valid & (key >= lo), x, float("-inf"))
        e = tl.exp(x - tl.max(x, axis=0))
        probs = e / tl.sum(e, axis=0)
        u = uniform_tl(tl.load(seed + b), tl.load(counter + b) + counter_offset, idx)
        race = tl.where(valid, probs / -tl.log(u), -1.0)  # argmax of p / Exp(1) is a draw from p
        token = tl.where(greedy > 0, token, tl.argmax(race, axis=0, tie_break_left=True))
    tl.store(tokens + b * stride_tok, token.to(tokens.dtype.element_ty))
    if HAS_EMBED:  # next step's input: a row of the precomputed projected embedding table
        src = embed_table + (token.to(tl.int64) + row_offset) * embed_dim
        for d0 in range(0, embed_dim, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            row = tl.load(src + cols, mask=cols < embed_dim)
            tl.store(next_input + b * stride_next + cols, row.to(next_input.dtype.element_ty), mask=cols < embed_dim)


def _check_sampler_args(batch, temperature, topk, seed, counter, counter_offset):
    """temperature/topk: Python numbers for the whole batch, or device tensors [B] (one per lane)."""
    if isinstance(topk, torch.Tensor):
        check("topk", topk, shape=(batch,), dtypes=INT_DTYPES, contiguous=True)
    elif not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int or an int tensor [B], got {topk!r}")
    if isinstance(temperature, torch.Tensor):
        check("temperature", temperature, shape=(batch,), dtypes=(torch.float32,), contiguous=True)
    elif not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a finite float >= 0 or an fp32 tensor [B], got {temperature!r}")
    if isinstance(temperature, torch.Tensor) != isinstance(topk, torch.Tensor):
        raise ValueError("temperature and topk must both be Python numbers or both be tensors [B]")
    if not isinstance(counter_offset, int):
        raise ValueError(f"counter_offset must be an int, got {counter_offset!r}")
    check("seed", seed, shape=(batch,), dtypes=INT_DTYPES, contiguous=True)
    check("counter", counter, shape=(batch,), dtypes=INT_DTYPES, contiguous=True)


def _launch_sampler(logits, temperature, topk, seed, counter, counter_offset, tokens, embed_table=None,
                    next_input=None, row_offset=0, codebook=None):
    batch, vocab = logits.shape
    per_lane = isinstance(temperature, torch.Tensor)
    has_embed = embed_table is not None
    embed_dim = embed_table.shape[1] if has_embed else 0
    launch(_sample_kernel, (batch,), logits, logits.stride(0), vocab, temperature if per_lane else float(temperature),
           topk if per_lane else min(topk, vocab), seed, counter, counter_offset, tokens, tokens.stride(0),
           embed_table if has_embed else logits, next_input if has_embed else logits,
           next_input.stride(0) if has_embed else 0, embed_dim, row_offset, logits if codebook is None else codebook,
           GREEDY=not per_lane and (temperature == 0 or topk == 1), PER_LANE=per_lane, V_PAD=next_pow2(vocab),
           HAS_EMBED=has_embed, BLOCK_D=min(next_pow2(max(embed_dim, 16)), 1024), CODEBOOK_TENSOR=codebook is not None,
           num_warps=8 if vocab > 2048 else 4)


def sample_topk(logits, temperature, topk, seed, counter, out=None, counter_offset=0):
    """Sesame's top-k sampler (see reference.sample_topk_ref) on the GPU.

    logits: [B, V] fp32/fp16/bf16 (last dim contiguous);
    temperature: float >= 0, or fp32 [B] per lane; topk: int >= 1, or int [B] per lane (both numbers or
    both tensors; tensor values are not checked: no host sync). Greedy where temperature == 0 or topk == 1.
    seed, counter: int64 [B] device tensors; row b draws from the stream (seed[b], counter[b] + counter_offset).
    out: optional int32/int64 [B] (may be strided, e.g. a column of a codes tensor). Returns out.
    """
    check("logits", logits, shape=(None, None), dtypes=FLOAT_DTYPES, last_contiguous=True)
    batch = logits.shape[0]
    _check_sampler_args(batch, temperature, topk, seed, counter, counter_offset)
    if out is None:
        out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    check("out", out, shape=(batch,), dtypes=INT_DTYPES)
    lane_params = dict(temperature=temperature, topk=topk) if isinstance(topk, torch.Tensor) else {}
    check_same_device(logits=logits, seed=seed, counter=counter, out=out, **lane_params)
    if batch:
        _launch_sampler(logits, temperature, topk, seed, counter, counter_offset, out)
    return out


def depth_step(h, head, codebook, embed_table, codes, next_input, seed, counter, temperature, topk, logits=None,
               counter_offset=0):
    """One depth-decoder step: logits = h @ head, sample, codes[:, codebook] = token,
    next_input = embed_table[token + codebook * V].

    h: [B, D] (fp32/fp16/bf16); head: [D, V] of h's dtype, any strides (audio_head[codebook - 1], or the
    backbone's codebook-0 head transposed); codebook: int, the codebook being sampled;
    embed_table: [num_codebooks * V, D'] contiguous (projection(audio_embeddings), precomputed);
    codes: int32/int64 [B, num_codebooks]; next_input: [B, D'] of embed_table's dtype (last dim contiguous);
    seed, counter: int64 [B] device tensors; the draw uses counter + counter_offset (e.g. counter holds
    frame_index * 32 and counter_offset = codebook, or counter already holds the sum and the offset is 0);
    temperature, topk: as in sample_topk (numbers, or per-lane tensors [B]);
    logits: optional fp32 [B, V] scratch (preallocate it for CUDA graphs; it holds the logits after).
    Returns (codes, next_input).
    """
    check("h", h, shape=(None, None), dtypes=FLOAT_DTYPES)
    batch, dim = h.shape
    check("head", head, shape=(dim, None), dtypes=(h.dtype,))
    vocab = head.shape[1]
    check("embed_table", embed_table, shape=(None, None), dtypes=FLOAT_DTYPES, contiguous=True)
    num_codebooks = embed_table.shape[0] // vocab
    if embed_table.shape[0] % vocab:
        raise ValueError(f"embed_table rows ({embed_table.shape[0]}) must be num_codebooks * vocab ({vocab})")
    if not isinstance(codebook, int) or not 0 <= codebook < num_codebooks:
        raise ValueError(f"codebook must be an int in [0, {num_codebooks}), got {codebook!r}")
    check("codes", codes, shape=(batch, num_codebooks), dtypes=INT_DTYPES)
    check("next_input", next_input, shape=(batch, embed_table.shape[1]), dtypes=(embed_table.dtype,),
          last_contiguous=True)
    _check_sampler_args(batch, temperature, topk, seed, counter, counter_offset)
    if logits is None:
        logits = torch.empty(batch, vocab, dtype=torch.float32, device=h.device)
    check("logits", logits, shape=(batch, vocab), dtypes=(torch.float32,), contiguous=True)
    lane_params = dict(temperature=temperature, topk=topk) if isinstance(topk, torch.Tensor) else {}
    check_same_device(h=h, head=head, embed_table=embed_table, codes=codes, next_input=next_input, seed=seed,
                      counter=counter, logits=logits, **lane_params)
    if batch == 0:
        return codes, next_input
    # fp32 (the IEEE path: CPU parity, not speed) in row blocks of 16: 32 or 64 spill registers on sm_80
    block_b, block_v = min(max(16, next_pow2(batch)), 16 if h.dtype == torch.float32 else 64), 32
    launch(_head_logits_kernel, (triton.cdiv(vocab, block_v), triton.cdiv(batch, block_b)), h, head, logits,
           batch, dim, vocab, h.stride(0), h.stride(1), head.stride(0), head.stride(1), logits.stride(0),
           BLOCK_B=block_b, BLOCK_K=128, BLOCK_V=block_v, IEEE=h.dtype == torch.float32, num_warps=4)
    _launch_sampler(logits, temperature, topk, seed, counter, counter_offset, codes[:, codebook], embed_table,
                    next_input, codebook * vocab)
    return codes, next_input


def sample_next_input(logits, temperature, topk, seed, counter, codebook, embed_table, tokens, next_input):
    """The depth loop's sampler: draw codebook `codebook`'s tokens from logits, write them to tokens
    and gather the next step's input row, in one launch (`reference.topk_race` + the gather).

    logits: [B, V] fp32/fp16/bf16 (last dim contiguous); temperature fp32 [B], topk int [B]: per lane;
    seed, counter: int64 [B]; codebook: int32/int64 [1] device tensor c (not checked: no host sync):
    the draw uses counter + c and the row is embed_table[token + c * V];
    embed_table: [num_codebooks * V, D'] contiguous; tokens: int [B] (may be strided, e.g. codes[:, c]);
    next_input: [B, D'] of embed_table's dtype (last dim contiguous). Returns next_input.
    """
    check("logits", logits, shape=(None, None), dtypes=FLOAT_DTYPES, last_contiguous=True)
    batch, vocab = logits.shape
    if not isinstance(temperature, torch.Tensor):
        raise ValueError("temperature and topk must be per-lane tensors [B]")
    _check_sampler_args(batch, temperature, topk, seed, counter, 0)
    check("codebook", codebook, shape=(1,), dtypes=INT_DTYPES)
    check("embed_table", embed_table, shape=(None, None), dtypes=FLOAT_DTYPES, contiguous=True)
    if embed_table.shape[0] % vocab:
        raise ValueError(f"embed_table rows ({embed_table.shape[0]}) must be num_codebooks * vocab ({vocab})")
    check("tokens", tokens, shape=(batch,), dtypes=INT_DTYPES)
    check("next_input", next_input, shape=(batch, embed_table.shape[1]), dtypes=(embed_table.dtype,),
          last_contiguous=True)
    check_same_device(logits=logits, temperature=temperature, topk=topk, seed=seed, counter=counter,
                      codebook=codebook, embed_table=embed_table, tokens=tokens, next_input=next_input)
    if batch:
        _launch_sampler(logits, temperature, topk, seed, counter, 0, tokens, embed_table, next_input,
                        codebook=codebook)
    return next_input
