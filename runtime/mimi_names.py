"""transformers' MimiModel tensor names -> moshi's Mimi names, so the Mimi bundled in a
transformers CSM checkpoint (``codec_model.*``) loads into moshi's implementation.

Checkpoint files use transformers' flat layout (``encoder.layers.N``, ``encoder_transformer.``,
``downsample.``); transformers 5 renames those on load to nested names (``encoder.encoder_seanet.
layers.N``, ``encoder.encoder_transformer.``, ``encoder.downsample.``).  Both are read.

The two differ in three ways: names (rules below), attention (transformers keeps q, k and v
apart; moshi stacks them in one ``in_projs.0`` matrix) and RoPE (transformers rotates the two
halves of each head, moshi interleaved pairs), so q and k rows are permuted back.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

# Inside one transformer layer: transformers' name -> moshi's (q/k/v are handled apart).
_LAYER = {
    "self_attn.o_proj.weight": "self_attn.out_projs.0.weight",
    "mlp.fc1.weight": "linear1.weight",
    "mlp.fc2.weight": "linear2.weight",
    "input_layernorm.weight": "norm1.weight",
    "input_layernorm.bias": "norm1.bias",
    "post_attention_layernorm.weight": "norm2.weight",
    "post_attention_layernorm.bias": "norm2.bias",
    "self_attn_layer_scale.scale": "layer_scale_1.scale",
    "mlp_layer_scale.scale": "layer_scale_2.scale",
}
_WHOLE = {
    "downsample.conv.weight": "downsample.conv.conv.conv.weight",
    "upsample.conv.weight": "upsample.convtr.convtr.convtr.weight",
}
# transformers 5's nested names -> the files' flat ones.
_NESTED = [(r"^(encoder|decoder)\.\1_seanet\.layers\.", r"\1.layers."),
           (r"^(?:encoder|decoder)\.((?:encoder|decoder)_transformer|downsample|upsample)\.", r"\1.")]


def flat_name(name: str) -> str:
    """The checkpoint file's name for a transformers MimiModel tensor, nested or flat."""
    for pattern, repl in _NESTED:
        name = re.sub(pattern, repl, name)
    return name
_QUANTIZERS = {"semantic": "rvq_first", "acoustic": "rvq_rest"}
_CODEBOOK = {"initialized": "_initialized", "cluster_usage": "cluster_usage", "embed_sum": "embedding_sum"}


def _candidates(name: str) -> list[str]:
    """moshi names that transformers' `name` may be (a SEANet conv is `conv.conv` or, for the
    decoder's upsampling layers, `convtr.convtr`: the caller picks the one the model has)."""
    if name in _WHOLE:
        return [_WHOLE[name]]
    m = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.((?:block\.\d+\.)?)conv\.(weight|bias)", name)
    if m:
        side, layer, block, kind = m.groups()
        return [f"{side}.model.{layer}.{block}{conv}.{conv}.{kind}" for conv in ("conv", "convtr")]
    m = re.fullmatch(r"(encoder|decoder)_transformer\.layers\.(\d+)\.(.+)", name)
    if m and m[3] in _LAYER:
        return [f"{m[1]}_transformer.transformer.layers.{m[2]}.{_LAYER[m[3]]}"]
    m = re.fullmatch(r"quantizer\.(semantic|acoustic)_residual_vector_quantizer\.(.+)", name)
    if m:
        rvq, rest = _QUANTIZERS[m[1]], m[2]
        if rest in ("input_proj.weight", "output_proj.weight"):
            return [f"quantizer.{rvq}.{rest}"]
        c = re.fullmatch(r"layers\.(\d+)\.codebook\.(\w+)", rest)
        if c and c[2] in _CODEBOOK:
            return [f"quantizer.{rvq}.vq.layers.{c[1]}._codebook.{_CODEBOOK[c[2]]}"]
    return []


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection laid out for RoPE on halves (i, i + d/2) -> on pairs (2i, 2i + 1)."""
    rows, dim = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, dim).transpose(1, 2).reshape(rows, dim)


def moshi_state_dict(tensors: Mapping[str, torch.Tensor] | Mapping[str, Callable[[], torch.Tensor]],
                     moshi_keys, n_heads: int, where: str) -> dict[str, torch.Tensor]:
    """moshi's state dict from transformers' MimiModel tensors (names without ``codec_model.``).

    `tensors` values may be tensors or functions that read one (so a memory-mapped checkpoint
    is read tensor by tensor).  Every name must map and every moshi tensor must be given;
    otherwise ValueError naming them and `where`."""
    moshi_keys = set(moshi_keys)
    read = {flat_name(k): (v if callable(v) else (lambda v=v: v)) for k, v in tensors.items()}
    state, unknown = {}, []
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, get in read.items():
        m = re.fullmatch(r"(encoder|decoder)_transformer\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight", name)
        if m:
            qkv.setdefault(f"{m[1]}_transformer.transformer.layers.{m[2]}.self_attn.in_projs.0.weight", {})[m[3]] = get()
            continue
        ours = [c for c in _candidates(name) if c in moshi_keys]
        if ours:
            state[ours[0]] = get()
        else:
            unknown.append(name)
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unknown.append(f"{key} (has only {sorted(parts)} of q, k, v)")
            continue
        state[key] = torch.cat([halves_to_interleaved(parts["q"], n_heads), halves_to_interleaved(parts["k"], n_heads),
                                parts["v"]])
    missing = sorted(moshi_keys - set(state))
    if unknown or missing:
        raise ValueError(f"{where} is not a Mimi codec moshi can load: "
                         + "; ".join(filter(None, [f"unknown tensors {_few(unknown)}" if unknown else "",
                                                   f"missing {len(missing)} tensors, e.g. {_few(missing)}" if missing else ""])))
    return state


def _few(names, n: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" ... ({len(names) - n} more)" if len(names) > n else "")
