"""Shared models and prompts for the engine tests (CPU, fp32, the `tiny` preset unless noted)."""
import time

import pytest
import torch

from misotts.runtime.audio import FRAME_MS
from misotts.runtime.config import PRESETS, ModelConfig
from misotts.runtime.params import GenerationParams
from misotts.engine import Engine, EngineConfig
from misotts.engine import engine as engine_module
from misotts.runtime.model import CSMModel
from misotts.runtime.prompt import Segment, build_prompt
from misotts.runtime.tokenizer import ByteTokenizer

TINY = PRESETS["tiny"]
TOKENIZER = ByteTokenizer(TINY.bos_id, TINY.eos_id)


def make_model(config: ModelConfig = TINY, seed: int = 0, std: float = 0.1) -> CSMModel:
    """Random weights, norms included (so a misplaced norm weight shows), fp32, CPU.

    Like a trained model it never emits the special ids 2048..2050 (their head columns are 0,
    below the top 50 of ~2048 random logits), so its codes can go back into a prompt as audio.
    """
    torch.manual_seed(seed)
    model = CSMModel(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    model.codebook0_head.weight.data[2048:] = 0
    model.audio_head.data[..., 2048:] = 0
    return model.eval().requires_grad_(False)


def prompt(text: str = "Hello there, how are you?", speaker: int = 0, context=()):
    return build_prompt(text, speaker, context, TOKENIZER, TINY.num_codebooks)


def random_codes(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2048, (frames, TINY.num_codebooks), generator=torch.Generator().manual_seed(seed))


def history(turns: int = 2, frames: int = 6, name: str = ""):
    """A few context turns with (random) audio codes."""
    return [Segment(t % 2, f"{name}turn number {t}, with some words", codes=random_codes(frames, seed=t))
            for t in range(turns)]


def params(max_frames: int = 3, **settings) -> GenerationParams:
    """Settings for a request of `max_frames` frames (unless max_audio_ms is given)."""
    settings.setdefault("max_audio_ms", max_frames * FRAME_MS)
    return GenerationParams(**settings)


def submit(engine, frames, mask, max_frames: int = 3, audio: bool = False, **settings):
    """engine.submit of a request of `max_frames` frames with `settings` (GenerationParams' fields)."""
    return engine.submit(frames, mask, params(max_frames, **settings), audio=audio)


def generate(engine, frames, mask, max_frames: int = 3, **settings):
    return engine.generate(frames, mask, params(max_frames, **settings))


@pytest.fixture(scope="session")
def tiny_model():
    return make_model()


@pytest.fixture
def engine(tiny_model):
    eng = Engine(tiny_model, EngineConfig(max_batch=8))
    yield eng
    eng.close()


@pytest.fixture(autouse=True)
def _tiny_matmuls_on_one_thread(one_thread):
    yield


@pytest.fixture(autouse=True)
def _pipelined_as_on_a_gpu(monkeypatch):
    """The engine tests run the loop as it runs on a GPU, one frame in flight (on a CPU it is off
    by default); a test that builds EngineConfig(pipelined=False) runs the other order."""
    monkeypatch.setattr(engine_module, "default_pipelined", lambda cuda: True)


def slow_frames(monkeypatch, engine, seconds: float):
    """Every frame of `engine` takes at least `seconds`, so a request of F frames cannot finish in
    under F * seconds however fast the machine: a test can rely on it still running."""
    run = engine.graphs.run

    def paced(n, *args, **kwargs):
        started = time.monotonic()
        run(n, *args, **kwargs)
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))

    monkeypatch.setattr(engine.graphs, "run", paced)


def frames_wait_for(monkeypatch, engine, submitted: list, count: int, timeout: float = 30.0):
    """Frame f does not start before min(f + 1, count) requests are in `submitted` (a list the
    test appends to as it submits): request i is certain to join a batch that is already running,
    and no request can finish before the next one arrives."""
    run = engine.graphs.run
    frame = [0]

    def gated(n, *args, **kwargs):
        deadline = time.monotonic() + timeout
        while len(submitted) < min(frame[0] + 1, count):
            if time.monotonic() > deadline:
                raise TimeoutError(f"frame {frame[0]}: only {len(submitted)} of {count} requests submitted")
            time.sleep(0.001)
        frame[0] += 1
        run(n, *args, **kwargs)

    monkeypatch.setattr(engine.graphs, "run", gated)
