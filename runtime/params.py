"""A request's settings: one frozen, typed object, checked once against the model's config.

    params = GenerationParams(seed=3, temperature=0.7).validate(tts.config)

Every layer takes this object -- the API, the engine, the server's HTTP and WebSocket routes,
the Ray replicas -- instead of the settings one by one.  The bounds that depend on the model
(top-k against the audio vocabulary) come from its `ModelConfig`; the others are the float and
int64 limits of the sampler (`runtime.sampling`), never a number copied into a caller.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .audio import FRAME_MS
from .prompt import check_speaker
from .sampling import MAX_SEED, InvalidParam, check_sampling_args, is_real, shown

__all__ = ["GenerationParams", "InvalidParam", "KEEP", "params_of"]


@dataclass(frozen=True)
class GenerationParams:
    speaker: int = 0  # written into the prompt's text ("[0]Hello")
    max_audio_ms: float = 10_000  # generation stops here (or at an all-zero frame)
    temperature: float = 0.9  # 0: greedy
    topk: int = 50
    seed: int = 0  # the same seed draws the same codes, on every op set
    stop_on_eos: bool = True  # False: run to max_audio_ms whatever the model emits

    @property
    def max_frames(self) -> int:
        """Frames to generate at most: whole frames of max_audio_ms, at least one."""
        return max(1, int(self.max_audio_ms // FRAME_MS))

    def validate(self, config) -> "GenerationParams":
        """self, with plain int / float / bool fields, if a model of `config` can serve it;
        InvalidParam (a ValueError naming the field) or TypeError (speaker) otherwise."""
        check_speaker(self.speaker)
        ms = self.max_audio_ms
        if not is_real(ms) or not 0 < ms < math.inf:
            raise InvalidParam(f"max_audio_ms must be a finite number > 0, got {shown(ms)}", "max_audio_ms")
        check_sampling_args(self.temperature, self.topk, config.audio_vocab_size, self.seed)
        if not isinstance(self.stop_on_eos, bool):
            raise InvalidParam(f"stop_on_eos must be True or False, got {shown(self.stop_on_eos)}", "stop_on_eos")
        return dataclasses.replace(self, speaker=int(self.speaker), max_audio_ms=float(ms), temperature=float(self.temperature),
                                   topk=int(self.topk), seed=int(self.seed))

    def replace(self, **changes) -> "GenerationParams":
        """A copy with some settings changed (unknown names are a TypeError)."""
        return dataclasses.replace(self, **changes)

    def for_turn(self, index: int) -> "GenerationParams":
        """Turn `index` of a long input samples with seed + index (wrapping past the int64 range)."""
        return self.replace(seed=(self.seed + index) % (MAX_SEED + 1))


FIELDS = tuple(f.name for f in dataclasses.fields(GenerationParams))


class _Keep:
    """The default of a `speaker` argument beside `params`: keep the params' own speaker (None is
    a bad speaker, refused as such)."""

    def __repr__(self) -> str:
        return "<the params' speaker>"


KEEP = _Keep()


def params_of(params: GenerationParams | None = None, speaker=KEEP, **settings) -> GenerationParams:
    """`params` (default GenerationParams()) with `speaker` (unless KEEP) and `settings` --
    GenerationParams' field names -- replacing its own; a setting of another name is a TypeError
    that lists the known ones."""
    if speaker is not KEEP:
        settings["speaker"] = speaker
    unknown = sorted(set(settings) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown generation setting(s) {', '.join(unknown)}: expected {', '.join(FIELDS)}")
    if params is not None and not isinstance(params, GenerationParams):
        raise TypeError(f"params must be a GenerationParams, got {type(params).__name__}")
    return dataclasses.replace(params or GenerationParams(), **settings)
