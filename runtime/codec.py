"""Mimi audio codec with CSM's shapes: mono 24 kHz samples [N] <-> RVQ codes [T, 32].

Mimi (Kyutai, package ``moshi``) turns every 1920 samples (one frame, 12.5 frames/s) into
one code per codebook; CSM uses the first 32 of its codebooks, each with 2048 entries.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from moshi.models import loaders
from moshi.quantization.core_vq import EuclideanCodebook
from safetensors import SafetensorError
from safetensors.torch import load_file

from .hub import HUB_ID
from .mimi_names import moshi_state_dict

UNTRAINED_SEED = 0
# Where the Mimi weights come from, in both spellings, for error messages.
CODEC_ARG = "--codec on the command line, codec= in misotts.load / load_codec"
# The untrained codebooks' entries are drawn at the scale of the untrained encoder's latents
# (std 0.19 measured on 0.1-std noise), so that encoding picks codes that follow the input.
_UNTRAINED_CODEBOOK_STD = 0.2
BUNDLED_PREFIX = "codec_model."  # transformers' CSM keeps its Mimi under this prefix
_WEIGHT_SUFFIXES = (".safetensors", ".sft", ".pt", ".pth", ".bin")


def load_codec(weights: str | os.PathLike | None = None, device="cpu", num_codebooks: int = 32) -> MimiCodec:
    """Build a Mimi codec.

    ``weights`` is one of:
      * ``None``: an UNTRAINED Mimi (seeded random weights; see `_untrained_init`). Deterministic
        and offline, for tests and benchmarks: its audio depends on the codes but is not speech.
        The caller's RNG state is left untouched.
      * a transformers CSM checkpoint folder (e.g. sesame/csm-1b): its bundled ``codec_model.*``.
      * a local ``.safetensors`` file of Mimi weights, named as moshi names them (e.g.
        ``loaders.MIMI_NAME`` from ``kyutai/moshiko-pytorch-bf16``) or as transformers' MimiModel does.
      * ``"hub"`` or a Hugging Face repo id such as ``"kyutai/moshiko-pytorch-bf16"``: downloads
        ``loaders.MIMI_NAME`` from that repo (``"hub"`` means ``loaders.DEFAULT_REPO``).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_SEED)
        # Built on the CPU so the same seed gives the same weights on every device.
        mimi = loaders.get_mimi(None, device="cpu", num_codebooks=num_codebooks)
        if weights is None:
            _untrained_init(mimi)
    if weights is not None:
        state, where = _read_weights(weights, mimi)
        try:
            mimi.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        except RuntimeError as e:  # shapes of another Mimi configuration
            raise ValueError(f"{where} does not fit moshi's Mimi: {str(e).splitlines()[-1].strip()}") from None
    mimi.set_num_codebooks(num_codebooks)
    return MimiCodec(mimi.to(device))


@torch.no_grad()
def _untrained_init(mimi) -> None:
    """Weights that keep the signal's scale through every layer, so decoded audio depends on the codes.

    moshi's own random initialisation shrinks the codes' contribution at each convolution until the
    biases alone set the output: every code sequence decodes to nearly the same waveform (a DC
    offset of 0.14 with differences of 4e-4).  Here weights are normal with variance 1/fan_in, biases zero
    and codebooks at the encoder latents' scale: decoded audio has std ~0.04 and other codes
    change it by as much (tests/runtime/test_codec.py measures it).
    """
    for module in mimi.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d, torch.nn.Linear)):
            w = module.weight
            # A transposed conv's weight is [in, out / groups, k]: each output sums in / groups * k inputs.
            fan_in = w.shape[0] * w.shape[2] // module.groups if isinstance(module, torch.nn.ConvTranspose1d) else w[0].numel()
            w.normal_(0.0, fan_in ** -0.5)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, EuclideanCodebook):
            module.embedding_sum.normal_(0.0, _UNTRAINED_CODEBOOK_STD)


def _read_weights(weights: str | os.PathLike, mimi) -> tuple[dict, str]:
    """moshi's state dict from a checkpoint folder, a weights file or a hub id; and a description."""
    path = Path(weights).expanduser()
    n_heads = mimi.decoder_transformer.transformer.layers[0].self_attn.num_heads
    if path.is_dir():
        from misotts.weights.checkpoint import bundled_codec  # the checkpoint reader knows shards and formats

        tensors = bundled_codec(path)
        if not tensors:
            raise ValueError(f"{path} holds no Mimi codec (no {BUNDLED_PREFIX}* tensors): pass Mimi weights "
                             f"with {CODEC_ARG}")
        where = f"the Mimi codec bundled in {path}"
        return moshi_state_dict(tensors, mimi.state_dict(), n_heads, where), where
    file = _weights_file(weights)
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read Mimi weights {file} ({e}): {CODEC_ARG} takes a .safetensors file of "
                         f"Mimi weights, a CSM checkpoint folder or a hub id") from None
    if set(tensors) == set(mimi.state_dict()):
        return tensors, file
    tensors = {k.removeprefix(BUNDLED_PREFIX): v for k, v in tensors.items()
               if k.startswith(BUNDLED_PREFIX) or not any(t.startswith(BUNDLED_PREFIX) for t in tensors)}
    return moshi_state_dict(tensors, mimi.state_dict(), n_heads, file), file


def _weights_file(weights: str | os.PathLike) -> str:
    """Local path of the Mimi weights: an existing file as is, a hub repo id downloaded."""
    path = Path(weights).expanduser()
    if path.is_file():
        return str(path)
    name = str(weights)
    if name != "hub" and (name.endswith(_WEIGHT_SUFFIXES) or not HUB_ID.fullmatch(name)):
        raise FileNotFoundError(f"Mimi weights not found: {name} ({CODEC_ARG})")
    repo = loaders.DEFAULT_REPO if name == "hub" else name
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    # A cached copy is used as is: asking the hub whether it changed costs retries when offline.
    cached = try_to_load_from_cache(repo, loaders.MIMI_NAME)
    if isinstance(cached, str):
        return cached
    from misotts.runtime.hub import check_reachable

    check_reachable(f"the Mimi codec ({repo}/{loaders.MIMI_NAME})",
                    f"Without network access, pass a local file instead ({CODEC_ARG}), "
                    f"e.g. --codec /path/to/{loaders.MIMI_NAME}")
    try:
        return hf_hub_download(repo, loaders.MIMI_NAME)
    except OSError as err:  # offline, missing repo, HTTP errors: all subclass OSError
        raise FileNotFoundError(
            f"could not get {loaders.MIMI_NAME} from Hugging Face hub repo {repo!r} ({err.__class__.__name__}). "
            f"Without network access, pass a local file instead ({CODEC_ARG}), "
            f"e.g. --codec /path/to/{loaders.MIMI_NAME}"
        ) from err


class MimiCodec:
    """Encodes mono 24 kHz audio to codes [T, num_codebooks] and decodes them back.

    ``stream_decoder`` decodes frame by frame; while one is open, ``encode``/``decode`` refuse to
    run, because Mimi keeps its streaming state inside the model. Everything runs under
    ``torch.no_grad`` rather than ``inference_mode``, whose output tensors would refuse later
    in-place edits by callers.
    """

    def __init__(self, mimi):
        self.mimi = mimi
        self.sample_rate = mimi.sample_rate  # audio.SAMPLE_RATE
        self.frame_size = mimi.frame_size  # audio.FRAME_SAMPLES samples per frame
        self.num_codebooks = mimi.num_codebooks
        self.cardinality = mimi.cardinality  # 2048 entries per codebook
        self.device = next(mimi.parameters()).device
        self._stream = None

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """Float samples [N] (mono, 24 kHz) -> codes LongTensor [ceil(N / 1920), num_codebooks]."""
        if not isinstance(wav, torch.Tensor) or not wav.is_floating_point() or wav.ndim != 1 or wav.numel() == 0:
            raise ValueError(f"encode expects a non-empty 1-D float tensor of 24 kHz samples, got {_describe(wav)}")
        self._check_not_streaming()
        codes = self.mimi.encode(wav.to(self.device, torch.float32)[None, None])  # [1, K, T]
        return codes[0].T.contiguous()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [T, num_codebooks] -> float32 samples [T * 1920]."""
        self._check_codes(codes, "T")
        if codes.shape[0] == 0:
            raise ValueError("decode needs at least one frame of codes, got shape (0, ...)")
        self._check_not_streaming()
        return self.mimi.decode(codes.T[None].to(self.device))[0, 0]

    def stream_decoder(self, batch_size: int = 1) -> MimiStreamDecoder:
        """A frame-by-frame decoder; use it as a context manager (or call ``close()``)."""
        return MimiStreamDecoder(self, batch_size)

    def _check_codes(self, codes, rows: str, num_rows: int | None = None):
        expected = f"[{rows}, {self.num_codebooks}]"
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor {expected}, got {_describe(codes)}")
        if codes.ndim != 2 or codes.shape[1] != self.num_codebooks or (num_rows is not None and codes.shape[0] != num_rows):
            raise ValueError(f"codes must have shape {expected}, got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.cardinality):
            raise ValueError(
                f"codes must lie in 0..{self.cardinality - 1}, got values {codes.min().item()}..{codes.max().item()}"
            )

    def _check_not_streaming(self):
        if self._stream is not None:
            raise RuntimeError("a stream decoder is open on this codec; close it first (Mimi holds its state)")


class MimiStreamDecoder:
    """Decodes one frame of codes [B, num_codebooks] at a time into samples [B, 1920].

    Mimi's causal convolutions and attention carry state across calls, so concatenated frames
    equal a whole ``decode`` of the same codes (to float32 rounding).
    """

    def __init__(self, codec: MimiCodec, batch_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.codec = codec
        self.batch_size = batch_size
        self._exit_stack = None

    def __enter__(self) -> MimiStreamDecoder:
        self.open()
        return self

    def __exit__(self, *exc_info):
        self.close()

    @torch.no_grad()
    def open(self):
        """Start streaming (done on the first ``decode_frame`` too); fails if another stream is open."""
        if self._exit_stack is None:
            self.codec._check_not_streaming()
            self._exit_stack = self.codec.mimi.streaming(self.batch_size)
            self.codec._stream = self

    @torch.no_grad()
    def decode_frame(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, num_codebooks] of the next frame -> float32 samples [B, 1920]."""
        self.codec._check_codes(codes, "B", self.batch_size)
        self.open()
        return self.codec.mimi.decode(codes[:, :, None].to(self.codec.device))[:, 0]

    def close(self):
        """End streaming and free its state; the codec can then encode/decode again."""
        if self._exit_stack is not None:
            self._exit_stack.close()
            self._exit_stack = None
            self.codec._stream = None


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
