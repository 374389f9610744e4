"""The systems measured side by side, on the same weights: our reference path, our engine (when
the runtime has one), and transformers' `CsmForConditionalGeneration.generate` (eager, and with a
static cache, which transformers compiles on CUDA).

Every system answers the first call; the peers the second, the engine the third instead:

- `stream(wl, frames, seed, audio)`: one stream of `frames` frames for workload `wl`; returns the
  times (seconds after the call) at which each frame reached the host -- its PCM when `audio`,
  else its codes -- and the codes [frames, 32].  Tokenizing and embedding the prompt are inside.
- `batch(wl, streams, frames, seed)`: `streams` copies of the workload at once (seeds differ),
  every frame decoded to PCM on the host (a static batch); returns the times (seconds after the
  call) at which each frame of all streams reached the host.
- `steady(wl, n, window_frames, frames, seed)` and `arrivals(...)` (the engine): its streams are
  independent, so a load of n can be held steady, timed in a window and joined (`load.py`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from misotts.runtime.audio import FRAME_MS
from misotts.runtime.params import GenerationParams
from misotts.runtime.prompt import audio_rows, mimi_codes

SAMPLING = dict(temperature=0.9, topk=50)


@dataclass
class Workload:
    name: str
    text: str
    speaker: int = 0
    context: tuple = ()


class Reference:
    """The public API (`TTS.iter_codes`, `TTS.stream`) on the reference engine (one lane, the
    torch ops, no CUDA graphs); the batch call is the plain model's frame loop with a batch
    dimension (a static batch)."""

    name = "reference"

    def __init__(self, tts):
        self.tts = tts

    def stream(self, wl: Workload, frames: int, seed: int, audio: bool):
        tts, times, codes = self.tts, [], []
        start = time.perf_counter()
        if audio:
            for chunk in tts.stream(wl.text, wl.speaker, wl.context, max_audio_ms=frames * FRAME_MS, seed=seed,
                                    chunk_frames=1, stop_on_eos=False, **SAMPLING):
                times.append(time.perf_counter() - start)
                codes.append(chunk.codes)
        else:
            for c in tts.iter_codes(wl.text, wl.speaker, wl.context, max_audio_ms=frames * FRAME_MS, seed=seed,
                                    stop_on_eos=False, **SAMPLING):
                codes.append(c[None].cpu())
                times.append(time.perf_counter() - start)
        return times, torch.cat(codes)

    @torch.inference_mode()
    def batch(self, wl: Workload, streams: int, frames: int, seed: int) -> list[float]:
        tts, model = self.tts, self.tts.model
        dev, n = tts.device, tts.config.num_codebooks
        start = time.perf_counter()
        rows, mask = tts.prompt(wl.text, wl.speaker, wl.context)
        model.setup_caches(streams, rows.shape[0] + frames)
        cur, cur_mask = rows.to(dev).expand(streams, -1, -1), mask.to(dev).expand(streams, -1, -1)
        positions = torch.arange(rows.shape[0], device=dev)
        seeds = torch.arange(streams, device=dev) + seed
        times = []
        with tts.codec.stream_decoder(batch_size=streams) as decoder:
            for t in range(frames):
                counter = torch.full((streams,), t * n, dtype=torch.long, device=dev)
                codes = model.generate_frame(cur, cur_mask, positions, SAMPLING["temperature"], SAMPLING["topk"],
                                             seeds, counter)
                decoder.decode_frame(mimi_codes(codes)).cpu()
                times.append(time.perf_counter() - start)
                cur, cur_mask = (rows[:, None] for rows in audio_rows(codes, end_of_audio=False))
                positions = positions[-1:] + 1
        return times


# ---- transformers --------------------------------------------------------------------------------

def to_transformers(model):
    """transformers' CsmForConditionalGeneration holding `model`'s tensors (shared, not copied).

    The config comes from `hf_config` (weights/formats.py), names from the weights package's HF name
    map (read backwards), the audio table is tied into the depth decoder as in real checkpoints.
    The codec stays transformers' default (untrained, unused: audio is decoded by our Mimi).
    """
    import transformers
    from transformers import CsmConfig, CsmForConditionalGeneration
    from transformers.initialization import no_init_weights

    from misotts.weights.formats import HF_NAMES, hf_config

    transformers.logging.set_verbosity_error()  # it warns that our RoPE/token settings are unusual; they are right
    config = CsmConfig(**hf_config(model.config), pad_token_id=None)
    with no_init_weights():
        hf = CsmForConditionalGeneration(config)
    state = {HF_NAMES.from_canonical(name): t for name, t in model.state_dict().items()}
    state["depth_decoder.model.embed_tokens.weight"] = model.audio_embeddings.weight
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith("codec_model.")]
    if missing or unexpected:
        raise RuntimeError(f"weight export to transformers: missing {missing}, unexpected {unexpected}")
    device = model.audio_head.device  # the weights are there already; move the buffers (RoPE, offsets)
    hf.backbone_model.to(device), hf.depth_decoder.to(device), hf.embed_text_tokens.to(device)
    return hf.eval()


class _FrameTimes:
    """A generate() streamer: notes when each frame's codes reach the host, optionally decoding
    them to PCM first.  generate() first puts the prompt ids; that put is skipped."""

    def __init__(self, start: float, decoder=None):
        self.start, self.decoder = start, decoder
        self.times, self.codes, self.prompt_seen = [], [], False

    def put(self, ids: torch.Tensor):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.decoder is not None:
            self.decoder.decode_frame(mimi_codes(ids).to(self.decoder.codec.device)).cpu()
        self.times.append(time.perf_counter() - self.start)
        self.codes.append(ids[:1].cpu())

    def end(self):
        pass


class Transformers:
    """`CsmForConditionalGeneration.generate` on our prompt rows, embedded by its own tables."""

    def __init__(self, tts, static: bool = False, max_len: int = 2048):
        self.tts, self.hf = tts, to_transformers(tts.model)
        self.name = "transformers-static" if static else "transformers"
        s = SAMPLING
        self.kwargs = dict(do_sample=True, temperature=s["temperature"], top_k=s["topk"],
                           depth_decoder_do_sample=True, depth_decoder_temperature=s["temperature"],
                           depth_decoder_top_k=s["topk"])
        if static:  # one static cache size for every call, so that torch.compile compiles once
            self.kwargs.update(cache_implementation="static", max_cache_len=max_len,
                               depth_decoder_cache_implementation="static")
            self.max_streams = 1  # every batch size would be a new compilation: measured at one stream

    def _embeds(self, rows, mask, streams):
        hf, n, dev = self.hf, self.tts.config.num_codebooks, self.tts.device
        rows, mask = rows.to(dev), mask.to(dev)
        table = hf.backbone_model.embed_tokens
        audio = table.embed_audio_tokens(rows[:, :n] + table.audio_tokens_offsets)
        text = hf.embed_text_tokens(rows[:, n])
        weights = mask.to(audio.dtype)
        embeds = (audio * weights[:, :n, None]).sum(1) + text * weights[:, n, None]
        return embeds[None].expand(streams, -1, -1)

    @torch.inference_mode()
    def _generate(self, wl, streams, frames, seed, timer):
        rows, mask = self.tts.prompt(wl.text, wl.speaker, wl.context)
        torch.manual_seed(seed)
        self.hf.generate(inputs_embeds=self._embeds(rows, mask, streams), max_new_tokens=frames, streamer=timer,
                         **self.kwargs)

    def stream(self, wl: Workload, frames: int, seed: int, audio: bool):
        start = time.perf_counter()
        with self.tts.codec.stream_decoder(batch_size=1) as decoder:
            timer = _FrameTimes(start, decoder if audio else None)
            self._generate(wl, 1, frames, seed, timer)
        return timer.times, torch.cat(timer.codes)

    def batch(self, wl: Workload, streams: int, frames: int, seed: int) -> list[float]:
        start = time.perf_counter()
        with self.tts.codec.stream_decoder(batch_size=streams) as decoder:
            timer = _FrameTimes(start, decoder)
            self._generate(wl, streams, frames, seed, timer)
        if len(timer.times) != frames:
            raise RuntimeError(f"transformers made {len(timer.times)} frames, not {frames}")
        return timer.times


# ---- our engine ----------------------------------------------------------------------------------

class EngineSystem:
    """`misotts.engine.Engine`: paged KV, prefix cache, CUDA graphs, continuous batching.
    Streams are submitted to its loop, which also decodes their PCM (one batched streaming Mimi
    call per frame, with the same Mimi weights as the API's)."""

    name = "engine"

    def __init__(self, tts, max_batch: int, max_positions: int, compile: bool | None = None):
        from misotts.engine import Engine, EngineConfig

        self.tts = tts
        block = EngineConfig.block_size
        # KV for every lane at the longest request, and as much again for the prefix cache.
        num_blocks = 2 * max_batch * -(-max_positions // block)
        # On the CPU the engine's fast path is its Inductor-compiled depth step (warm-up compiles it
        # once per batch bucket, before anything is timed); on CUDA it is the captured graphs.
        compile = tts.device.type == "cpu" if compile is None else compile
        self.engine = Engine(tts.model, EngineConfig(max_batch=max_batch, num_blocks=num_blocks, compile=compile),
                             codec=tts.codec)
        self.max_streams = max_batch  # a load above its lanes would queue, not run at once
        self.last_stats = None

    def forget(self):
        """Drop the prefix cache, so the next request prefills its whole prompt."""
        self.engine.wait_idle()
        self.engine.pool.clear_cache()

    def close(self):
        self.engine.close()

    def _submit(self, wl, frames, seed, audio):
        rows, mask = self.tts.prompt(wl.text, wl.speaker, wl.context)
        params = GenerationParams(max_audio_ms=frames * FRAME_MS, seed=seed, stop_on_eos=False, **SAMPLING)
        return self.engine.submit(rows, mask, params, audio=audio)

    @torch.inference_mode()
    def stream(self, wl: Workload, frames: int, seed: int, audio: bool):
        start, times, codes = time.perf_counter(), [], []
        stream = self._submit(wl, frames, seed, audio)
        for frame in stream:  # with audio, frames arrive with their PCM
            times.append(time.perf_counter() - start)
            codes.append(frame.codes[None])
        self.last_stats = stream.stats  # its first-audio breakdown, for the latency runs
        return times, torch.cat(codes)

    def submitter(self, wl: Workload, frames: int, seed: int, count: int = 1, unique: bool = False):
        """submit(i) -> stream i of `frames` frames with audio (seed + i).  unique: the i-th of `count`
        prompts starts with its own number, so no two share a prefix-cache block (each prefills its
        whole prompt); they are tokenized here, before anything is timed."""
        texts = [f"{i}. {wl.text}" if unique else wl.text for i in range(count if unique else 1)]
        prompts = [self.tts.prompt(text, wl.speaker, wl.context) for text in texts]

        def submit(i: int):
            rows, mask = prompts[i % len(prompts)]
            params = GenerationParams(max_audio_ms=frames * FRAME_MS, seed=seed + i, stop_on_eos=False, **SAMPLING)
            with torch.inference_mode():
                return self.engine.submit(rows, mask, params, audio=True)

        return submit

    def _idle(self) -> None:
        """Wait for the cancelled streams to leave, so the next run starts on an idle engine."""
        if not self.engine.wait_idle():
            raise RuntimeError("the engine was not idle 60 s after its streams were cancelled")

    def steady(self, wl: Workload, n: int, window_frames: int, frames: int, seed: int) -> dict:
        """`load.steady_run` of n streams of `frames` frames; returns when the engine is idle again."""
        from .load import steady_run

        try:
            return steady_run(self.submitter(wl, frames, seed), n, window_frames)
        finally:
            self._idle()

    def arrivals(self, wl: Workload, background: int, probes: int, frames: int, seed: int) -> dict:
        """`load.ttfa_under_load`: `probes` new streams arriving one by one into `background` running."""
        from .load import ttfa_under_load

        try:
            return ttfa_under_load(self.submitter(wl, frames, seed, background + probes, unique=True), background,
                                   probes)
        finally:
            self._idle()
