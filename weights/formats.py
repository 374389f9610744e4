"""Checkpoint formats: which one a folder holds, its config, and what its tensor names mean in ours.

Everything we know about a format other than our own lives here. Three layouts are read (see
runtime/model.py for our canonical names):

- ``misotts``: ours. config.json with ``"format": "misotts"`` (`ModelConfig.to_dict`);
  model.safetensors or a sharded model.safetensors.index.json.  Names are canonical already.
- ``hf``: transformers' CSM. config.json with ``"model_type": "csm"`` (``CsmConfig``); same weight
  files.  Mimi is bundled as ``codec_model.*`` (ignored: the codec is loaded on its own).
- ``sesame``: Sesame's original (torchtune names). config.json with backbone_flavor /
  decoder_flavor and model.safetensors, or a ``ckpt.pt`` torch checkpoint.  Its q/k weights are
  laid out for RoPE on interleaved pairs; we rotate halves, so they are permuted on load.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from misotts.runtime.config import (AUDIO_VOCAB_SIZE, LLAMA3_BOS, LLAMA3_EOS, NUM_CODEBOOKS, PRESETS, ModelConfig,
                                    RopeScaling, TransformerConfig)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TORCH_FILE = "ckpt.pt"

# Sesame's first release shipped ckpt.pt alone; its generator hard-coded the CSM-1B shapes.
SESAME_DEFAULT_CONFIG = {"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M"}


# ---- which format ---------------------------------------------------------------------------

def read_config_json(path: Path) -> dict | None:
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object (the model's config), got a {type(config).__name__}")
    return config


def detect_format(path: str | Path) -> str:
    """'misotts', 'hf' or 'sesame', from the files in the checkpoint folder `path`.

    The one place a format is recognised: by the fields of its config.json, or (Sesame's first
    release) by a ckpt.pt with no config."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path} (--model / source=)")
    config = read_config_json(path) or {}
    weights = weight_file(path)
    if weights and config.get("format") == "misotts":
        return "misotts"
    if weights and (config.get("model_type") == "csm" or "depth_decoder_config" in config):
        return "hf"
    if weights and "backbone_flavor" in config:
        return "sesame"
    if weights == TORCH_FILE and not config:
        return "sesame"
    found = sorted(p.name for p in path.iterdir())
    listed = ", ".join(found[:20]) + (f", ... ({len(found) - 20} more)" if len(found) > 20 else "")
    raise ValueError(
        f"{path} (--model / source=) holds no checkpoint in a format we read (found: {listed or 'nothing'}). "
        f"Supported: ours (config.json with \"format\": \"misotts\"), transformers CSM (config.json "
        f"with \"model_type\": \"csm\"), Sesame's original (config.json with backbone_flavor, or "
        f"ckpt.pt); each with {SINGLE_FILE}, a sharded {INDEX_FILE}, or (Sesame) {TORCH_FILE}"
    )


def weight_file(path: Path) -> str | None:
    """The file the weights are read from: the shard index, else the single file, else ckpt.pt."""
    for name in (INDEX_FILE, SINGLE_FILE, TORCH_FILE):
        if (path / name).is_file():
            return name
    return None


FORMAT_NAMES = {"misotts": "MisoTTS", "hf": "transformers CSM", "sesame": "Sesame"}


def read_config(path: Path, fmt: str) -> ModelConfig:
    """The config of the checkpoint folder `path`, whose format `detect_format` found to be `fmt`:
    its fields checked (types, ranges), so that a bad config.json is a ValueError naming the file
    and the field, not an error from deep inside torch.  (Whether BOS/EOS fit the vocabulary is
    checked on the tokenizer: a tokenizer.json's template may name other ids than the config.)"""
    d = read_config_json(path) or SESAME_DEFAULT_CONFIG
    try:
        config = CONFIG_READERS[fmt](d)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"lacks {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{path / 'config.json'} is not a valid {FORMAT_NAMES[fmt]} config: {what}") from None
    return config


# ---- configs --------------------------------------------------------------------------------

def config_from_hf(d: dict) -> ModelConfig:
    """Our config from the fields of transformers' ``CsmConfig``."""
    dec = d.get("depth_decoder_config") or {}
    if not isinstance(dec, dict):
        raise ValueError(f"depth_decoder_config must be an object, got {dec!r}")
    bos = d.get("bos_token_id")
    try:
        backbone = _transformer_from_hf(d, default_max_len=2048)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"backbone: {'lacks ' if isinstance(e, KeyError) else ''}{e}") from None
    try:
        decoder = _transformer_from_hf(dec, default_max_len=33)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"depth_decoder_config: {'lacks ' if isinstance(e, KeyError) else ''}{e}") from None
    return ModelConfig(
        backbone=backbone,
        decoder=decoder,
        text_vocab_size=d.get("text_vocab_size", 128_256),
        audio_vocab_size=d.get("vocab_size", AUDIO_VOCAB_SIZE),
        num_codebooks=d.get("num_codebooks", NUM_CODEBOOKS),
        bos_id=LLAMA3_BOS if bos is None else bos,
        eos_id=LLAMA3_EOS,
        name=d.get("_name_or_path") or "csm",
    )


def _transformer_from_hf(d: dict, default_max_len: int) -> TransformerConfig:
    # transformers >= 5 keeps rope settings in `rope_parameters`; 4.x used rope_theta + rope_scaling.
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    base = rope.get("rope_theta", d.get("rope_theta", 500_000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"unsupported rope_type {kind!r} (supported: default, llama3)")
    scaling = None
    if kind == "llama3":
        scaling = RopeScaling(
            factor=rope["factor"],
            low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"],
        )
    n_heads = d.get("num_attention_heads", 32)
    return TransformerConfig(
        dim=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        ffn_dim=d["intermediate_size"],
        head_dim=d.get("head_dim") or 0,
        norm_eps=d.get("rms_norm_eps", 1e-5),
        rope_base=float(base),
        rope_scaling=scaling,
        max_seq_len=d.get("max_position_embeddings", default_max_len),
    )


def hf_config(config: ModelConfig) -> dict:
    """The transformers ``CsmConfig`` fields for a model of `config` (without the codec config)."""

    def fields(t: TransformerConfig) -> dict:
        rope = {"rope_type": "default", "rope_theta": t.rope_base}
        if t.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": t.rope_base, **dataclasses.asdict(t.rope_scaling)}
        return dict(hidden_size=t.dim, num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads,
                    num_key_value_heads=t.n_kv_heads, intermediate_size=t.ffn_dim, head_dim=t.head_dim,
                    rms_norm_eps=t.norm_eps, rope_parameters=rope, max_position_embeddings=t.max_seq_len)

    return {
        **fields(config.backbone), "model_type": "csm", "text_vocab_size": config.text_vocab_size,
        "vocab_size": config.audio_vocab_size, "num_codebooks": config.num_codebooks, "bos_token_id": config.bos_id,
        "depth_decoder_config": {**fields(config.decoder), "backbone_hidden_size": config.backbone.dim,
                                 "vocab_size": config.audio_vocab_size, "num_codebooks": config.num_codebooks},
    }


# Sesame's flavours (torchtune llama3_2 builders): the shapes of our presets' transformers.
SESAME_FLAVORS = {
    "llama-1B": PRESETS["csm-1b"].backbone,
    "llama-100M": PRESETS["csm-1b"].decoder,
    "llama-8B": PRESETS["miso-8b"].backbone,
    "llama-300M": PRESETS["miso-8b"].decoder,
}


def config_from_sesame(d: dict) -> ModelConfig:
    """Our config from Sesame's (flavour names for the shapes)."""
    flavors = {"backbone_flavor": d.get("backbone_flavor"), "decoder_flavor": d.get("decoder_flavor")}
    for key, flavor in flavors.items():
        if flavor not in SESAME_FLAVORS:
            raise ValueError(f"unknown Sesame {key} {flavor!r}; known: {sorted(SESAME_FLAVORS)}")
    return ModelConfig(
        backbone=SESAME_FLAVORS[flavors["backbone_flavor"]],
        decoder=SESAME_FLAVORS[flavors["decoder_flavor"]],
        text_vocab_size=d.get("text_vocab_size", 128_256),
        audio_vocab_size=d.get("audio_vocab_size", AUDIO_VOCAB_SIZE),
        num_codebooks=d.get("audio_num_codebooks", NUM_CODEBOOKS),
        name=f"sesame-{flavors['backbone_flavor']}",
    )


CONFIG_READERS = {"misotts": ModelConfig.from_dict, "hf": config_from_hf, "sesame": config_from_sesame}


# ---- names ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class NameMap:
    """How a format names tensors, as data so that it reads both ways.

    whole: names renamed as a whole; stacks: transformer prefixes (file -> ours); layer: names
    inside a layer; final_norm: the stack's last norm; fallbacks: tied copies, used only when
    the primary name is absent; ignored: a pattern for tensors that are not ours to load.
    """

    whole: dict[str, str]
    stacks: dict[str, str]
    layer: dict[str, str]
    final_norm: str
    fallbacks: dict[str, str] = field(default_factory=dict)
    ignored: str | None = None

    def to_canonical(self, name: str) -> str | None:
        """Our name for a file's tensor name, or None if the name means nothing to us."""
        if name in self.whole:
            return self.whole[name]
        for prefix, ours in self.stacks.items():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if rest == self.final_norm:
                return f"{ours}norm.weight"
            m = re.fullmatch(r"layers\.(\d+)\.(.+)", rest)
            if m and m[2] in self.layer:
                return f"{ours}layers.{m[1]}.{self.layer[m[2]]}"
        return None

    def from_canonical(self, name: str) -> str:
        """The file's name for one of ours (for error messages)."""
        whole = {v: k for k, v in self.whole.items()}
        if name in whole:
            return whole[name]
        for prefix, ours in self.stacks.items():
            if name == f"{ours}norm.weight":
                return prefix + self.final_norm
            m = re.fullmatch(re.escape(ours) + r"layers\.(\d+)\.(.+)", name)
            if m:
                layer = {v: k for k, v in self.layer.items()}
                return f"{prefix}layers.{m[1]}.{layer.get(m[2], m[2])}"
        return name

    def is_ignored(self, name: str) -> bool:
        return self.ignored is not None and re.search(self.ignored, name) is not None


HF_NAMES = NameMap(
    whole={
        "embed_text_tokens.weight": "text_embeddings.weight",
        "backbone_model.embed_tokens.embed_audio_tokens.weight": "audio_embeddings.weight",
        "lm_head.weight": "codebook0_head.weight",
        "depth_decoder.model.inputs_embeds_projector.weight": "projection.weight",
        "depth_decoder.codebooks_head.weight": "audio_head",
    },
    stacks={"backbone_model.": "backbone.", "depth_decoder.model.": "decoder."},
    layer={
        "self_attn.q_proj.weight": "attn.wq.weight",
        "self_attn.k_proj.weight": "attn.wk.weight",
        "self_attn.v_proj.weight": "attn.wv.weight",
        "self_attn.o_proj.weight": "attn.wo.weight",
        "mlp.gate_proj.weight": "mlp.w_gate.weight",
        "mlp.up_proj.weight": "mlp.w_up.weight",
        "mlp.down_proj.weight": "mlp.w_down.weight",
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "mlp_norm.weight",
    },
    final_norm="norm.weight",
    # transformers ties the depth decoder's audio table to the backbone's and saves one of them.
    fallbacks={"depth_decoder.model.embed_tokens.weight": "audio_embeddings.weight"},
    ignored=r"^codec_model\.",
)

SESAME_NAMES = NameMap(
    whole={n: n for n in ("text_embeddings.weight", "audio_embeddings.weight", "codebook0_head.weight",
                          "projection.weight", "audio_head")},
    stacks={"backbone.": "backbone.", "decoder.": "decoder."},
    layer={
        "attn.q_proj.weight": "attn.wq.weight",
        "attn.k_proj.weight": "attn.wk.weight",
        "attn.v_proj.weight": "attn.wv.weight",
        "attn.output_proj.weight": "attn.wo.weight",
        "mlp.w1.weight": "mlp.w_gate.weight",
        "mlp.w3.weight": "mlp.w_up.weight",
        "mlp.w2.weight": "mlp.w_down.weight",
        "sa_norm.scale": "attn_norm.weight",
        "mlp_norm.scale": "mlp_norm.weight",
    },
    final_norm="norm.scale",
    # Buffers a torchtune model may have saved along with its parameters (masks, caches, RoPE).
    ignored=r"causal_mask$|\.kv_cache\.|\.pos_embeddings\.",
)


class CanonicalNames:
    """Our own format: names are canonical, nothing is renamed."""

    fallbacks: dict[str, str] = {}

    def to_canonical(self, name: str) -> str:
        return name

    def from_canonical(self, name: str) -> str:
        return name

    def is_ignored(self, name: str) -> bool:
        return False


NAME_MAPS = {"misotts": CanonicalNames(), "hf": HF_NAMES, "sesame": SESAME_NAMES}


# ---- RoPE layout ----------------------------------------------------------------------------

def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute q/k projection rows [n_heads * d, dim] so that RoPE on halves (i, i + d/2) gives
    what RoPE on interleaved pairs (2i, 2i + 1) gave: row 2i + j of a head moves to j * d/2 + i."""
    rows, dim = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def rope_heads(name: str, config) -> int | None:
    """Heads to permute a Sesame tensor (canonical `name`) by, or None if it has no RoPE."""
    m = re.fullmatch(r"(backbone|decoder)\.layers\.\d+\.attn\.w([qk])\.weight", name)
    if not m:
        return None
    t = config.backbone if m[1] == "backbone" else config.decoder
    return t.n_heads if m[2] == "q" else t.n_kv_heads
