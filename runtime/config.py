"""Model configuration: presets, and reading the config.json of each checkpoint format.

A CSM-architecture model is two Llama-style transformers (backbone over time, depth decoder
over the codebooks of one frame) plus embeddings and heads; `ModelConfig` holds both shapes
and the vocabularies.  Three on-disk layouts are understood:

- ours (``"format": "misotts"``), written by `ModelConfig.to_dict`;
- transformers' ``CsmConfig`` (``"model_type": "csm"``);
- Sesame's original (``backbone_flavor`` / ``decoder_flavor`` names).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

AUDIO_VOCAB_SIZE = 2051  # 2048 Mimi codes + specials
NUM_CODEBOOKS = 32
LLAMA3_BOS, LLAMA3_EOS = 128000, 128001


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling (factor, low/high frequency factors, original context)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class TransformerConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0  # 0 means dim // n_heads
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    def num_parameters(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        return self.n_layers * (attn + mlp + 2 * self.dim) + self.dim


@dataclass(frozen=True)
class ModelConfig:
    backbone: TransformerConfig
    decoder: TransformerConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = AUDIO_VOCAB_SIZE
    num_codebooks: int = NUM_CODEBOOKS
    bos_id: int = LLAMA3_BOS
    eos_id: int = LLAMA3_EOS
    tokenizer: str = "llama3"  # "llama3" (tokenizer.json beside the weights) or "bytes"
    name: str = "custom"

    @property
    def max_seq_len(self) -> int:
        return self.backbone.max_seq_len

    def num_parameters(self) -> int:
        d_bb, d_dec, v = self.backbone.dim, self.decoder.dim, self.audio_vocab_size
        embeddings = (self.text_vocab_size + v * self.num_codebooks) * d_bb
        heads = v * d_bb + d_bb * d_dec + (self.num_codebooks - 1) * d_dec * v
        return self.backbone.num_parameters() + self.decoder.num_parameters() + embeddings + heads

    # ---- our own format -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["format"] = "misotts"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = {k: v for k, v in d.items() if k != "format"}

        def transformer(t: dict) -> TransformerConfig:
            t = dict(t)
            scaling = t.pop("rope_scaling", None)
            return TransformerConfig(**t, rope_scaling=RopeScaling(**scaling) if scaling else None)

        return cls(**{**d, "backbone": transformer(d["backbone"]), "decoder": transformer(d["decoder"])})

    # ---- transformers' CsmConfig ------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        dec = d.get("depth_decoder_config") or {}
        bos = d.get("bos_token_id")
        return cls(
            backbone=_hf_transformer(d, default_max_len=2048),
            decoder=_hf_transformer(dec, default_max_len=33),
            text_vocab_size=d.get("text_vocab_size", 128_256),
            audio_vocab_size=d.get("vocab_size", AUDIO_VOCAB_SIZE),
            num_codebooks=d.get("num_codebooks", NUM_CODEBOOKS),
            bos_id=LLAMA3_BOS if bos is None else bos,
            eos_id=LLAMA3_EOS,
            name=d.get("_name_or_path") or "csm",
        )

    # ---- Sesame's original ---------------------------------------------------------------
    @classmethod
    def from_sesame_dict(cls, d: dict) -> "ModelConfig":
        flavors = {"backbone_flavor": d.get("backbone_flavor"), "decoder_flavor": d.get("decoder_flavor")}
        for key, flavor in flavors.items():
            if flavor not in SESAME_FLAVORS:
                raise ValueError(f"unknown Sesame {key} {flavor!r}; known: {sorted(SESAME_FLAVORS)}")
        return cls(
            backbone=SESAME_FLAVORS[flavors["backbone_flavor"]],
            decoder=SESAME_FLAVORS[flavors["decoder_flavor"]],
            text_vocab_size=d.get("text_vocab_size", 128_256),
            audio_vocab_size=d.get("audio_vocab_size", AUDIO_VOCAB_SIZE),
            num_codebooks=d.get("audio_num_codebooks", NUM_CODEBOOKS),
            name=f"sesame-{flavors['backbone_flavor']}",
        )

    def to_hf_dict(self) -> dict:
        """The transformers ``CsmConfig`` fields for this model (without the codec config)."""

        def fields(t: TransformerConfig) -> dict:
            rope = {"rope_type": "default", "rope_theta": t.rope_base}
            if t.rope_scaling is not None:
                rope = {"rope_type": "llama3", "rope_theta": t.rope_base, **dataclasses.asdict(t.rope_scaling)}
            return dict(hidden_size=t.dim, num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads,
                        num_key_value_heads=t.n_kv_heads, intermediate_size=t.ffn_dim, head_dim=t.head_dim,
                        rms_norm_eps=t.norm_eps, rope_parameters=rope, max_position_embeddings=t.max_seq_len)

        return {
            **fields(self.backbone), "model_type": "csm", "text_vocab_size": self.text_vocab_size,
            "vocab_size": self.audio_vocab_size, "num_codebooks": self.num_codebooks, "bos_token_id": self.bos_id,
            "depth_decoder_config": {**fields(self.decoder), "backbone_hidden_size": self.backbone.dim,
                                     "vocab_size": self.audio_vocab_size, "num_codebooks": self.num_codebooks},
        }


def _hf_transformer(d: dict, default_max_len: int) -> TransformerConfig:
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


# Sesame's flavours (torchtune llama3_2 builders); the 8B and 300M ones are MisoTTS's shapes.
SESAME_FLAVORS = {
    "llama-1B": TransformerConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192),
    "llama-100M": TransformerConfig(dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=8192),
    "llama-8B": TransformerConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336),
    "llama-300M": TransformerConfig(dim=1024, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=8192),
}

PRESETS = {
    "miso-8b": ModelConfig(backbone=SESAME_FLAVORS["llama-8B"], decoder=SESAME_FLAVORS["llama-300M"], name="miso-8b"),
    "csm-1b": ModelConfig(backbone=SESAME_FLAVORS["llama-1B"], decoder=SESAME_FLAVORS["llama-100M"], name="csm-1b"),
    # A few million parameters, byte-level text: for tests and the demo.  Untrained.
    "tiny": ModelConfig(
        backbone=TransformerConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128),
        decoder=TransformerConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=33),
        text_vocab_size=258, bos_id=256, eos_id=257, tokenizer="bytes", name="tiny",
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}") from None


def config_from_json_dict(d: dict) -> ModelConfig:
    """Pick the reader by the fields present: ours, transformers', or Sesame's."""
    if d.get("format") == "misotts":
        return ModelConfig.from_dict(d)
    if d.get("model_type") == "csm" or "depth_decoder_config" in d:
        return ModelConfig.from_hf_dict(d)
    if "backbone_flavor" in d:
        return ModelConfig.from_sesame_dict(d)
    raise ValueError(
        "config.json is not a CSM config: expected our 'format': 'misotts', transformers' "
        "'model_type': 'csm', or Sesame's 'backbone_flavor'/'decoder_flavor'"
    )
