"""Model configuration: the shapes of a model, and the presets.

A CSM-architecture model is two Llama-style transformers (backbone over time, depth decoder
over the codebooks of one frame) plus embeddings and heads; `ModelConfig` holds both shapes
and the vocabularies.  `to_dict` / `from_dict` are our own config.json; reading the other
checkpoint formats' configs is weights/formats.py's job.
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
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("head_dim", self.head_dim, minimum=0)
        for name in ("norm_eps", "rope_base"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
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

    def __post_init__(self):
        for name in ("text_vocab_size", "audio_vocab_size", "num_codebooks"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("bos_id", "eos_id"):  # whether they fit the vocabulary is the format's to say (weights/formats.py)
            _check_int(name, getattr(self, name), minimum=0)
        if self.tokenizer not in ("llama3", "bytes"):
            raise ValueError(f"tokenizer must be 'llama3' or 'bytes', got {self.tokenizer!r}")
        if not isinstance(self.backbone, TransformerConfig) or not isinstance(self.decoder, TransformerConfig):
            raise ValueError("backbone and decoder must be TransformerConfigs")

    @property
    def max_seq_len(self) -> int:
        return self.backbone.max_seq_len

    def num_parameters(self) -> int:
        d_bb, d_dec, v = self.backbone.dim, self.decoder.dim, self.audio_vocab_size
        embeddings = (self.text_vocab_size + v * self.num_codebooks) * d_bb
        heads = v * d_bb + d_bb * d_dec + (self.num_codebooks - 1) * d_dec * v
        return self.backbone.num_parameters() + self.decoder.num_parameters() + embeddings + heads

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["format"] = "misotts"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        # "quantization": a quantised checkpoint's scheme (weights/quantize.py reads it), not a shape.
        d = {k: v for k, v in d.items() if k not in ("format", "quantization")}

        def transformer(key: str) -> TransformerConfig:
            if key not in d:
                raise ValueError(f"lacks {key!r}")
            if not isinstance(d[key], dict):
                raise ValueError(f"{key} must be an object, got {d[key]!r}")
            t = dict(d[key])
            scaling = t.pop("rope_scaling", None)
            try:
                return TransformerConfig(**t, rope_scaling=RopeScaling(**scaling) if scaling else None)
            except (TypeError, ValueError) as e:  # TypeError: an unknown or missing field
                raise ValueError(f"{key}: {e}") from None

        backbone, decoder = transformer("backbone"), transformer("decoder")
        try:
            return cls(**{**d, "backbone": backbone, "decoder": decoder})
        except TypeError as e:
            raise ValueError(str(e).replace("ModelConfig.__init__() ", "")) from None


def _check_int(name: str, value, minimum: int) -> None:
    # bool is an int to Python, and "64" from a hand-edited config.json is not one.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# The shapes a preset builds; weights/formats.py maps Sesame's flavour names onto them.
PRESETS = {
    # MisoTTS: a Llama-3-8B-shaped backbone and a 300M depth decoder.
    "miso-8b": ModelConfig(
        backbone=TransformerConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336),
        decoder=TransformerConfig(dim=1024, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=8192),
        name="miso-8b",
    ),
    # Sesame's CSM-1B: a Llama-3.2-1B backbone and a 100M depth decoder.
    "csm-1b": ModelConfig(
        backbone=TransformerConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192),
        decoder=TransformerConfig(dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=8192),
        name="csm-1b",
    ),
    # A few million parameters, byte-level text: for tests and the demo.  Untrained.
    "tiny": ModelConfig(
        backbone=TransformerConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128),
        decoder=TransformerConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=33),
        text_vocab_size=258, bos_id=256, eos_id=257, tokenizer="bytes", name="tiny",
    ),
}
