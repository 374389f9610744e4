"""The public face: `load` a model, `TTS.generate` / `TTS.stream` speech, `Audio` results."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from misotts.chunks import Audio, AudioStream, Chunker, GenerationStats
from misotts.conversation import Conversation
from misotts.runtime.audio import SAMPLE_RATE, load_audio
from misotts.runtime.config import PRESETS, ModelConfig
from misotts.runtime.devices import DTYPES, resolve_device
from misotts.runtime.hub import DEFAULT_CODEC, PRESET_HUB_IDS
from misotts.engine import Engine, EngineConfig
from misotts.runtime.params import KEEP, GenerationParams, params_of
from misotts.runtime.model import CSMModel
from misotts.runtime.prompt import build_prompt
from misotts.runtime.tokenizer import ByteTokenizer, Llama3Tokenizer, check_special_ids, load_tokenizer
from misotts.weights import load_model, random_model
from misotts.weights.checkpoint import bundled_codec
from misotts.weights.load import default_dtype, stored_scheme
from misotts.weights.quantize import check_device, model_weights


@dataclass
class TTS:
    """A loaded model, its tokenizer, its Mimi codec (loaded on first use) and the engine that
    makes its frames (`misotts.engine.Engine`: the only way frames are made).  `start_engine`
    sizes it; a TTS used before that serves through the reference engine (one lane, the torch
    ops, no CUDA graphs: `EngineConfig.reference`)."""

    model: CSMModel
    tokenizer: object
    codec_source: str | None = None  # None: the untrained Mimi
    untrained: bool = False
    source: str = ""
    backend: Engine | None = None  # made by start_engine, or on first use
    _codec: object = None

    def start_engine(self, config: EngineConfig | dict | None = None, progress: bool = False) -> Engine:
        """Serve through an engine of `config` from now on (warm-up and, on CUDA, graph capture
        happen here); the engine it replaces is closed."""
        if isinstance(config, dict):
            config = EngineConfig(**config)
        if self.backend is not None:
            self.backend.close()
        self.backend = Engine(self.model, config, progress=progress, codec=lambda: self.codec)
        try:  # the audio path is ready before the first request, as the rest of the engine is
            self.backend.start_audio()
        except OSError:  # no codec to be had (offline): codes are still served; audio requests get the error
            pass
        return self.backend

    @property
    def engine(self) -> Engine:
        """The engine (its stats, its prefix cache); the reference engine if none was started."""
        if self.backend is None:
            self.start_engine(EngineConfig.reference(self.config.max_seq_len))
        return self.backend

    def close(self) -> None:
        """Stop the engine (its thread ends, queued and running requests get EngineStopped) and
        drop the codec.  Closing twice does nothing more; open engines are also closed at exit."""
        if self.backend is not None:
            self.backend.close()
        self._codec = None

    def __enter__(self) -> "TTS":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.audio_head.device

    @property
    def codec(self):
        if self._codec is None:
            from misotts.runtime.codec import load_codec  # moshi loads with the codec, not with the package

            self._codec = load_codec(self.codec_source, device=self.device, num_codebooks=self.config.num_codebooks)
        return self._codec

    def prompt(self, text: str, speaker: int = 0, context=()):
        """The prompt rows (frames, mask [S, 33]) for a turn after `context`."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("text must be a non-empty string")
        # Each generated frame takes a position too: the prompt must leave room for one.
        return build_prompt(text, speaker, context, self.tokenizer, self.config.num_codebooks, self._encode_audio,
                            text_vocab_size=self.config.text_vocab_size, max_positions=self.config.max_seq_len - 1)

    def _encode_audio(self, audio) -> torch.Tensor:
        return self.codec.encode(load_audio(audio, SAMPLE_RATE).to(self.device)).cpu()

    def params(self, params: GenerationParams | None = None, speaker: int = KEEP,
               **settings) -> GenerationParams:
        """`params` (default GenerationParams()) with `speaker` and `settings` (its field names:
        max_audio_ms, temperature, topk, seed, stop_on_eos) replacing its own, validated against
        this model's config."""
        return params_of(params, speaker, **settings).validate(self.config)

    def submit(self, text: str, speaker: int = KEEP, context=(), params: GenerationParams | None = None, *,
               audio: bool = False, **settings):
        """Start a generation; returns its stream of `Frame(codes, audio)` at once (iterate it,
        `async for` it, `cancel()` it).  Settings: `params`, or GenerationParams' fields as
        keywords (seed=1, max_audio_ms=4000, ...); stop_on_eos=False runs to max_audio_ms."""
        params = self.params(params, speaker, **settings)  # before the prompt: a bad setting encodes no audio
        frames, mask = self.prompt(text, params.speaker, context)
        return self.engine.submit(frames, mask, params, audio=audio)

    def iter_codes(self, text: str, speaker: int = KEEP, context=(), params: GenerationParams | None = None,
                   **settings) -> Iterator[torch.Tensor]:
        """Codes [32] per frame, as they are generated (no audio decoding)."""
        for frame in self.submit(text, speaker, context, params, **settings):
            yield frame.codes

    def generate_codes(self, text: str, speaker: int = KEEP, context=(),
                       params: GenerationParams | None = None, **settings) -> torch.Tensor:
        return self.submit(text, speaker, context, params, **settings).codes()

    def stream(self, text: str, speaker: int = KEEP, context=(), params: GenerationParams | None = None, *,
               chunk_frames: int = 1, first_chunk_frames: int = 1, **settings) -> AudioStream:
        """`Audio` chunks as they are made (iterate, or `async for`): the first after
        `first_chunk_frames` frames, then every `chunk_frames` (the last may be shorter).
        Concatenated, the chunks equal `generate()` with the same settings.  The stream's `stats`
        fill in as it runs.  The request is submitted at the first chunk asked for; closing the
        stream early cancels it."""
        chunker = Chunker(GenerationStats(), first_chunk_frames, chunk_frames)
        args = (text, speaker, context, params)
        return AudioStream(lambda: self.submit(*args, audio=True, **settings),
                           lambda: self._submit_off_loop(*args, audio=True, **settings), chunker)

    astream = stream  # `async for chunk in tts.astream(...)`: the same stream; cancelling the task cancels it

    async def _submit_off_loop(self, *args, **kwargs):
        """`submit` in a worker thread: building the prompt encodes context audio, which must
        not stall the event loop.  A task cancelled meanwhile cancels the request it made."""
        pending = asyncio.get_running_loop().run_in_executor(None, lambda: self.submit(*args, **kwargs))
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            pending.add_done_callback(lambda done: done.cancelled() or done.exception() or done.result().cancel())
            raise

    def generate(self, text: str, speaker: int = KEEP, context=(), params: GenerationParams | None = None,
                 **settings) -> Audio:
        """Speech for `text` spoken by `speaker`, following the conversation in `context`; its
        `stats` are the generation's."""
        stream = self.stream(text, speaker, context, params, chunk_frames=8, **settings)
        audio = Audio.concat(list(stream), self.config.num_codebooks)
        audio.stats = stream.stats
        return audio

    def conversation(self, context=()) -> Conversation:
        """A dialogue: each turn (generated or given) joins the context of the next; on the engine
        the next turn reuses the earlier turns' KV cache."""
        return Conversation(self, context)

    def info(self) -> dict:
        # Quantised linears hold their codes and scales as buffers; the count is the float model's.
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return {"source": self.source, "config": self.config.to_dict(), "parameters": self.config.num_parameters(),
                "weight_bytes": sum(t.nbytes for t in tensors), "weights": model_weights(self.model),
                "device": str(self.device),
                "dtype": str(self.model.audio_head.dtype).replace("torch.", ""), "untrained": self.untrained,
                "codec": self.codec_source or "untrained Mimi (random weights)",
                "backend": f"engine ({self.engine.stats()['ops']} ops, {self.engine.max_batch} lanes)"}


def load(source: str | Path = "tiny", device=None, dtype: torch.dtype | str | None = None, *,
         random_init: bool = False, seed: int = 0, codec: str | None = None,
         tokenizer: str | Path | None = None, progress: bool = True, backend: str = "auto",
         engine: dict | None = None, weights: str | None = None) -> TTS:
    """Load a model by preset name ("tiny", "csm-1b", "miso-8b"), local path or hub id.

    random_init: build the named preset with seeded random weights (no download; for
    benchmarks).  "tiny" is always random: it exists for tests and the demo.
    codec: Mimi weights (a .safetensors path or hub repo id); default the untrained Mimi for
    random models and kyutai's Mimi for real checkpoints.
    tokenizer: a tokenizer.json to use instead of the one beside the weights.
    dtype: a torch dtype or its name ("bf16", "bfloat16", "fp32", ...).
    backend: "auto" serves through the engine (misotts.engine: paged KV with prefix reuse,
    continuous batching; Triton kernels and CUDA graphs on CUDA, torch ops on the CPU);
    "reference" through the reference engine: one lane, the torch ops, no CUDA graphs.
    engine: EngineConfig fields for "auto" ("reference" is a fixed configuration), e.g. {"max_batch": 8, "num_blocks": 4096}.
    weights: "int8", "fp8" or "int4" quantises the transformers' linears as they load
    (weights/quantize.py; the CPU runs int8); a quantised checkpoint loads in its own scheme.
    """
    if backend not in ("auto", "reference"):
        raise ValueError(f"unknown backend {backend!r}: expected 'auto' or 'reference'")
    dtype = _dtype(dtype)
    tts = _load(source, device, dtype, random_init, seed, codec, tokenizer, progress, weights)
    tts.start_engine(engine if backend == "auto" else EngineConfig.reference(tts.config.max_seq_len), progress=progress)
    return tts


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype {dtype!r}: expected a torch dtype or one of {', '.join(sorted(DTYPES))}")


def _load(source, device, dtype, random_init, seed, codec, tokenizer, progress, weights=None) -> TTS:
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    name = str(source)
    check_device(weights or stored_scheme(name), device)  # before anything loads
    if name in PRESETS and (random_init or name == "tiny"):
        config = PRESETS[name]
        model = random_model(config, seed=seed, device=device, dtype=dtype, progress=progress, weights=weights)
        # Random weights make noise whatever the text; bytes stand in when no tokenizer.json is given.
        tok = Llama3Tokenizer(tokenizer, config.bos_id, config.eos_id) if tokenizer else ByteTokenizer(config.bos_id, config.eos_id)
        check_special_ids(tok, config.text_vocab_size, name)
        return TTS(model.eval(), tok, codec_source=codec, untrained=True, source=f"{name} (random weights, seed {seed})")
    if name in PRESETS and name not in PRESET_HUB_IDS:
        raise ValueError(f"no public checkpoint is known for {name!r}: pass a local checkpoint folder "
                         f"(--model DIR / source=DIR), or --random-init / random_init=True for seeded random "
                         f"weights of this shape")
    model, config, checkpoint_dir = load_model(PRESET_HUB_IDS.get(name, name), device=device, dtype=dtype,
                                               progress=progress, weights=weights)
    check_device(model_weights(model), device)  # a quantised checkpoint fetched from the hub
    tok = Llama3Tokenizer(tokenizer, config.bos_id, config.eos_id) if tokenizer else load_tokenizer(config, checkpoint_dir)
    check_special_ids(tok, config.text_vocab_size, str(checkpoint_dir))
    # transformers' CSM checkpoints bundle their Mimi; kyutai's is fetched only for those that do not.
    bundled = str(checkpoint_dir) if bundled_codec(checkpoint_dir) else None
    return TTS(model.eval(), tok, codec_source=codec or bundled or DEFAULT_CODEC, source=name)
