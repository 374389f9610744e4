"""GenerationParams: one typed object for a request's settings, checked against the model's config."""
import dataclasses

import pytest

import misotts
from misotts.runtime.config import PRESETS
from misotts.runtime.params import GenerationParams, InvalidParam, params_of

TINY = PRESETS["tiny"]


def test_topk_is_bounded_by_the_models_audio_vocabulary_not_a_constant():
    small, large = (dataclasses.replace(TINY, audio_vocab_size=v) for v in (1000, 4099))
    assert GenerationParams(topk=1000).validate(small).topk == 1000
    with pytest.raises(InvalidParam, match=r"topk must be an integer in 1\.\.1000, got 1001") as err:
        GenerationParams(topk=1001).validate(small)
    assert err.value.param == "topk"
    assert GenerationParams(topk=4099).validate(large).topk == 4099  # over the presets' 2051


@pytest.mark.parametrize("field, value", [
    ("seed", -1), ("seed", 2**63), ("seed", 1.5), ("temperature", -1.0), ("temperature", 1e-41),
    ("temperature", float("nan")), ("topk", 0), ("topk", True), ("max_audio_ms", 0), ("max_audio_ms", float("inf")),
    ("max_audio_ms", "10"), ("stop_on_eos", 1),
])
def test_a_bad_setting_names_its_field(field, value):
    with pytest.raises(InvalidParam, match=field) as err:
        GenerationParams(**{field: value}).validate(TINY)
    assert err.value.param == field and isinstance(err.value, ValueError)


def test_validate_gives_plain_python_numbers():
    import numpy as np

    p = GenerationParams(speaker=np.int64(2), topk=np.int32(7), seed=np.uint8(3), temperature=np.float32(0.5),
                         max_audio_ms=np.int64(400)).validate(TINY)
    assert [type(getattr(p, f)) for f in ("speaker", "topk", "seed", "temperature", "max_audio_ms")] == \
        [int, int, int, float, float]
    assert p == GenerationParams(speaker=2, topk=7, seed=3, temperature=0.5, max_audio_ms=400.0)


def test_max_frames_counts_whole_frames_of_80_ms_and_at_least_one():
    assert [GenerationParams(max_audio_ms=ms).max_frames for ms in (1, 80, 159.9, 160, 10_000)] == [1, 1, 1, 2, 125]


def test_turns_of_a_long_input_count_their_seed_up_and_wrap_inside_int64():
    p = GenerationParams(seed=5, topk=7)
    assert [p.for_turn(i).seed for i in range(3)] == [5, 6, 7] and p.for_turn(2).topk == 7
    assert GenerationParams(seed=2**63 - 1).for_turn(2).seed == 1


def test_params_of_replaces_settings_and_refuses_unknown_names():
    base = GenerationParams(seed=4, topk=9)
    assert params_of(base, seed=5) == GenerationParams(seed=5, topk=9)
    assert params_of(seed=5) == GenerationParams(seed=5)
    with pytest.raises(TypeError, match="unknown generation setting.*max_frames"):
        params_of(base, max_frames=3)
    with pytest.raises(TypeError, match="GenerationParams"):
        params_of({"seed": 1})


def test_params_are_frozen_and_exported_by_the_package():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GenerationParams().seed = 1
    assert misotts.GenerationParams is GenerationParams


def test_a_speaker_argument_replaces_the_params_speaker_only_when_given():
    base = GenerationParams(speaker=3)
    assert params_of(base).speaker == 3 and params_of(base, 5).speaker == 5
    with pytest.raises(TypeError, match="speaker must be an integer id"):  # None is a bad speaker, not "unset"
        params_of(base, None).validate(TINY)
