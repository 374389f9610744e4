"""The server's request settings are GenerationParams, bounded by the served model's config."""
import dataclasses

import pytest

from misotts.runtime.config import PRESETS
from misotts.runtime.params import GenerationParams
from misotts.server.errors import ApiError
from misotts.server.speech import parse_speech

TINY = PRESETS["tiny"]
BODY = {"model": "m", "input": "Hello.", "voice": "3"}


def test_topk_bound_is_the_served_models_audio_vocabulary():
    large = dataclasses.replace(TINY, audio_vocab_size=4099)
    assert parse_speech({**BODY, "topk": 3000}, None, large).params.topk == 3000
    with pytest.raises(ApiError) as err:
        parse_speech({**BODY, "topk": 3000}, None, TINY)
    assert err.value.status == 400 and err.value.param == "topk" and "1..2051" in err.value.message


def test_the_settings_arrive_as_one_validated_params():
    req = parse_speech({**BODY, "seed": 2**63 - 1, "temperature": 0, "max_audio_ms": 400}, None, TINY)
    assert req.params == GenerationParams(speaker=3, seed=2**63 - 1, temperature=0.0, max_audio_ms=400.0)
    assert req.speaker == 3


@pytest.mark.parametrize("field, value", [("max_audio_ms", 79), ("max_audio_ms", 60_001), ("seed", 2**63)])
def test_the_servers_own_limits_and_the_models_both_name_the_field(field, value):
    with pytest.raises(ApiError) as err:
        parse_speech({**BODY, field: value}, None, TINY)
    assert err.value.status == 400 and err.value.param == field
