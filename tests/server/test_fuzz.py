"""Property: no input makes the server answer 500.  Hypothesis generates speech request bodies
(valid fields mixed with hostile values) and WebSocket message sequences; every answer is a 200 or
a 4xx in OpenAI's envelope, the keep-alive connection stays usable, and the server stays healthy.
Derandomized, so CI runs the same few hundred examples every time."""
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from .serving import no_blocks_held, wait_for

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Values a careless or hostile client sends where a number, a string or a list belongs.
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
    st.sampled_from([10**400, -10**400, 10**4000, 2**63, 2**64, -1, 0, 1e308, -1e308, 5e-324, 1.5]),
    st.text(max_size=20), st.sampled_from(["", " ", "٣", "²", "1" * 5000, "0\n", "\ud800", "alloy\n", "../x",
                                            "nan", "inf", "-0", "0x10", "1_0", "١٢٣"]),
    st.lists(st.integers(), max_size=3), st.just([]), st.just([[]]), st.just({}), st.just({"id": 3}),
)
VALID = {
    "model": st.just("tiny"),
    "input": st.sampled_from(["Hi.", "Hello there. Again!", "ok"]),
    "voice": st.sampled_from(["0", 1, "alloy", "nova", {"id": "echo"}]),
    "response_format": st.sampled_from(["pcm", "wav", "flac"]),
    "stream_format": st.sampled_from([None, "audio", "sse"]),
    "seed": st.integers(0, 2**40),
    "temperature": st.sampled_from([0, 0.5, 0.9]),
    "topk": st.integers(1, 60),
    "max_audio_ms": st.sampled_from([80, 100, 160]),
    "speed": st.just(1.0),
}


def turn():
    codes = st.one_of(st.just([[1] * 32]), st.just([[1] * 4]), st.just([]), st.just([[]]), st.just([[2048] * 32]),
                      st.just([[-1] * 32]), st.just([[1.5] * 32]), st.just([[10**30] * 32]), st.just([[True] * 32]),
                      HOSTILE)
    audio = st.one_of(st.just("UklGRg=="), st.just("not base64!"), st.just("\u00e9\u00e9"), HOSTILE)
    return st.fixed_dictionaries({"speaker": st.one_of(st.integers(0, 3), HOSTILE), "text": st.one_of(st.just("a"), HOSTILE)},
                                 optional={"codes": codes, "audio": audio})


@st.composite
def speech_bodies(draw):
    """Mostly valid bodies with one to three fields made hostile; sometimes not an object at all."""
    kind = draw(st.sampled_from(["fields", "fields", "fields", "fields", "raw", "deep", "context"]))
    if kind == "raw":
        return draw(st.one_of(st.binary(max_size=50), st.sampled_from(
            [b"", b"null", b"[]", b"1e999", b"{\"input\": 1" + b"0" * 5000 + b"}", b"\xff\xfe{", b"{\"a\":}",
             "{\"input\": \"\\ud800\"}".encode()])))
    if kind == "deep":
        depth = draw(st.sampled_from([50, 5000, 200_000]))
        return (b"[" * depth + b"]" * depth) if draw(st.booleans()) else \
            json.dumps({"model": "tiny", "voice": "0", "input": "Hi."})[:-1].encode() + b', "context": ' + \
            b"[" * depth + b"]" * depth + b"}"
    body = {name: draw(strategy) for name, strategy in VALID.items()}
    if body["stream_format"] is None:
        del body["stream_format"]
    for name in draw(st.lists(st.sampled_from([*VALID, "instructions", "context", "extra"]), max_size=3)):
        body[name] = draw(HOSTILE)
    if kind == "context":
        body["context"] = draw(st.lists(turn(), max_size=2))
    return json.dumps(body).encode()


def is_envelope(payload) -> bool:
    error = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) and {"type", "param", "code"} <= set(error)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=httpx.Timeout(60.0)) as c:
        yield c


@FUZZ
@given(body=speech_bodies())
def test_no_request_body_gets_a_500(client, body):
    response = client.post("/v1/audio/speech", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200 or 400 <= response.status_code < 500, (body[:200], response.text[:300])
    if response.status_code != 200:
        assert is_envelope(response.json()), response.text[:300]
        assert response.headers.get("connection") != "close", (body[:200], response.text[:300])  # still usable
    assert client.get("/health").status_code == 200


def _not_long_audio(value) -> bool:
    return not (isinstance(value, (int, float)) and not isinstance(value, bool) and 80 < value <= 60_000)


MESSAGES = st.one_of(
    st.fixed_dictionaries({"type": st.just("text.delta"), "text": st.one_of(st.sampled_from(["Hi. ", "ok", "a b"]),
                                                                             HOSTILE)}),
    st.fixed_dictionaries({"type": st.just("session.config")},
                          optional={"voice": st.one_of(st.sampled_from(["0", "alloy"]), HOSTILE),
                                    "seed": HOSTILE, "temperature": HOSTILE, "topk": HOSTILE,
                                    # nothing longer than 80 ms gets through: every sentence stays quick
                                    "max_audio_ms": st.one_of(st.just(80), HOSTILE.filter(_not_long_audio)),
                                    "context": st.one_of(st.lists(turn(), max_size=1), HOSTILE),
                                    "response_format": st.one_of(st.just("pcm"), HOSTILE)}),
    st.fixed_dictionaries({"type": HOSTILE}),
    st.just({"type": "cancel"}),
    HOSTILE,
)
class Raw:
    """A frame sent as it is (any other message is a JSON value, sent as JSON text)."""

    def __init__(self, data):
        self.data = data

    def __repr__(self):
        return f"Raw({self.data[:60]!r})"


RAW = st.one_of(st.binary(max_size=20), st.sampled_from(["not json", "[" * 100_000 + "]" * 100_000,
                                                          '{"type": "text.delta", "text": 1' + "0" * 5000 + "}"]))


@settings(FUZZ, max_examples=40)
@given(messages=st.lists(st.one_of(MESSAGES, RAW.map(Raw)), min_size=1, max_size=6))
def test_no_websocket_message_ends_the_session_or_gets_a_500(server, tts, messages):
    url = server.replace("http://", "ws://") + "/v1/audio/speech/stream"
    # the fuzzed configs first (one may be taken), then a short one (refused if one was), so that
    # the fuzzed text is spoken 80 ms a sentence either way
    configs = [m for m in messages if isinstance(m, dict) and m.get("type") == "session.config"]
    rest = [m for m in messages if not (isinstance(m, dict) and m.get("type") == "session.config")]
    with connect(url, max_size=None) as ws:
        for message in [*configs, {"type": "session.config", "max_audio_ms": 80}, *rest]:
            ws.send(message.data if isinstance(message, Raw) else json.dumps(message))
        ws.send(json.dumps({"type": "text.done"}))
        events = []
        while not events or events[-1]["type"] != "done":
            received = ws.recv(timeout=60)  # a closed session raises ConnectionClosed: the test fails
            if isinstance(received, str):
                events.append(json.loads(received))
    for event in events:
        if event["type"] == "error":
            assert is_envelope(event) and event["error"]["code"] != "internal_error", event
    wait_for(lambda: no_blocks_held(tts), 30, "the session's blocks to be freed")
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
