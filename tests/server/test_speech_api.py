"""POST /v1/audio/speech over loopback: the openai client, raw httpx, every format, the errors.

Each audio check compares against `tts.generate` with the same seed (the server's engine and
the test's are the same one, used one request at a time, so pcm16 is byte-equal)."""
import base64
import json
import threading
import time

import httpx
import openai
import pytest

import misotts
from misotts.runtime.prompt import Segment, mimi_codes
from misotts.server import create_app
from misotts.server.long_text import split_turns

from .serving import decode, expected_pcm, no_blocks_held, running, wait_for

FRAME = 1920
TIMEOUT = httpx.Timeout(60.0)


def speech(url, **fields):
    body = {"model": "tiny", "voice": "0", "input": "Hello there.", "max_audio_ms": 160, **fields}
    return httpx.post(f"{url}/v1/audio/speech", json=body, timeout=TIMEOUT)


def test_openai_client_pcm_equals_generate(server, tts):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60, max_retries=0)
    response = client.audio.speech.create(model="tiny", voice="alloy", input="Hello there.", response_format="pcm",
                                          extra_body={"seed": 3, "max_audio_ms": 240})
    assert response.content == expected_pcm(tts, "Hello there.", speaker=0, seed=3, max_audio_ms=240)
    assert int(response.response.headers["x-prefix-computed-positions"]) > 0
    other = client.audio.speech.create(model="tiny", voice="1", input="Hello there.", response_format="pcm",
                                       extra_body={"seed": 3, "max_audio_ms": 240})
    assert other.content == expected_pcm(tts, "Hello there.", speaker=1, seed=3, max_audio_ms=240)
    assert other.content != response.content


def test_openai_client_streams_a_wav(server, tts):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60, max_retries=0)
    with client.audio.speech.with_streaming_response.create(
            model="tiny", voice="0", input="Stream me.", response_format="wav",
            extra_body={"stream_format": "audio", "seed": 5, "max_audio_ms": 400}) as response:
        parts = list(response.iter_bytes())
    data = b"".join(parts)
    assert data[:4] == b"RIFF" and data[44:] == expected_pcm(tts, "Stream me.", seed=5, max_audio_ms=400)
    rate, samples = decode(data)
    assert rate == 24_000 and len(samples) == 5 * FRAME


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac"])
@pytest.mark.parametrize("stream", ["none", "audio", None])  # None: the default, which streams
def test_encoded_formats_decode_to_24khz_of_the_right_length(server, fmt, stream):
    fields = {"response_format": fmt, "max_audio_ms": 320, "seed": 1}
    if stream:
        fields["stream_format"] = stream
    response = speech(server, **fields)
    assert response.status_code == 200, response.text
    rate, samples = decode(response.content)
    n = 4 * FRAME  # mp3 and aac add the encoder's priming and padding; opus and flac are exact
    assert rate == (48_000 if fmt == "opus" else 24_000)  # Ogg Opus always decodes at 48 kHz
    expected = n * rate // 24_000
    assert expected <= len(samples) <= expected + 2 * 1152 * rate // 24_000, len(samples)


def test_sse_deltas_concatenate_to_generate_and_end_with_usage(server, tts):
    body = {"model": "tiny", "voice": "0", "input": "Events.", "response_format": "pcm", "stream_format": "sse",
            "seed": 7, "max_audio_ms": 400}
    with httpx.stream("POST", f"{server}/v1/audio/speech", json=body, timeout=TIMEOUT) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2  # the first frame leaves on its own
    assert b"".join(base64.b64decode(e["audio"]) for e in deltas) == expected_pcm(tts, "Events.", seed=7,
                                                                                  max_audio_ms=400)
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["output_tokens"] == 5


@pytest.mark.parametrize("field, value", [
    ("model", None), ("input", ""), ("input", 5), ("voice", None), ("voice", "nobody"), ("voice", 70000),
    ("response_format", "ogg"), ("speed", 0.1), ("speed", 4.5), ("speed", "fast"), ("stream_format", "chunks"),
    ("seed", -1), ("seed", 1.5), ("temperature", -1), ("temperature", float("1e39")), ("topk", 0), ("topk", True),
    ("max_audio_ms", 0), ("max_audio_ms", 10**9), ("context", "x"), ("context", [{"speaker": 0}]),
    ("context", [{"speaker": 0, "text": "a", "codes": [[5000] * 32]}]),
    ("context", [{"speaker": 0, "text": "a", "audio": "not base64!"}]), ("instructions", 5), ("strict", "yes"),
    ("colour", "red"),
])
def test_each_bad_field_gets_a_400_naming_it(server, field, value):
    body = {"model": "tiny", "voice": "0", "input": "Hello.", "max_audio_ms": 160, field: value}
    if value is None:
        body.pop(field)
    response = httpx.post(f"{server}/v1/audio/speech", content=json.dumps(body), timeout=TIMEOUT,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"].split("[")[0] == field


def test_bad_json_and_a_prompt_too_long_are_400s(server):
    response = httpx.post(f"{server}/v1/audio/speech", content=b"{nope", timeout=TIMEOUT,
                          headers={"content-type": "application/json"})  # a keyless server takes JSON only
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    codes = [[1] * 32] * 3000  # context audio past the 2,048-position window
    response = speech(server, context=[{"speaker": 0, "text": "a", "codes": codes}])
    assert response.status_code == 400 and "context window" in response.json()["error"]["message"]


def test_input_over_the_limit_is_413(server):
    response = speech(server, input="a" * 4097)
    assert response.status_code == 413 and response.json()["error"]["param"] == "input"


def test_unknown_route_is_an_enveloped_404(server):
    response = httpx.get(f"{server}/v1/nothing", timeout=TIMEOUT)
    assert response.status_code == 404 and "message" in response.json()["error"]


def test_long_input_is_spoken_turn_after_turn_with_the_context_carried(server, tts):
    text = ("The first sentence is here. The second one follows it. A third sentence ends the first turn. "
            "Then a fourth begins again.")
    turns = split_turns(text, 40, lambda t: len(tts.tokenizer.encode(f"[0]{t}")))
    assert len(turns) >= 2
    response = speech(server, input=text, response_format="pcm", seed=11, max_audio_ms=160)
    assert response.status_code == 200
    expected, context = b"", []
    for i, turn in enumerate(turns):
        audio = tts.generate(turn, speaker=0, context=context, seed=11 + i, max_audio_ms=160)
        expected += expected_pcm(tts, turn, speaker=0, context=context, seed=11 + i, max_audio_ms=160)
        context = context + [Segment(0, turn, codes=mimi_codes(audio.codes))]
    assert response.content == expected
    # the second turn followed the first turn's audio: alone it would have sounded different
    alone = expected_pcm(tts, turns[1], speaker=0, seed=12, max_audio_ms=160)
    assert response.content[len(response.content) // len(turns):][:len(alone)] != alone
    assert int(response.headers["x-prefix-computed-positions"]) > 0


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server, tts):
    body = {"model": "tiny", "voice": "0", "input": "A long one.", "response_format": "pcm",
            "stream_format": "audio", "max_audio_ms": 60_000}  # 750 frames: minutes on this CPU
    before = tts.engine.stats()["frames_run"]
    with httpx.stream("POST", f"{server}/v1/audio/speech", json=body, timeout=TIMEOUT) as response:
        first = next(response.iter_raw())
        assert len(first) >= 2 * FRAME
    wait_for(lambda: no_blocks_held(tts), 30, "the cancelled request to free its blocks")
    assert tts.engine.stats()["frames_run"] - before < 300


def test_a_full_queue_is_429_with_retry_after(tts):
    # one lane, one waiting place: a running request and a queued one fill it
    small = misotts.api.TTS(tts.model, tts.tokenizer, untrained=True, _codec=tts.codec)
    small.start_engine({"max_batch": 1, "max_waiting": 1})
    body = {"model": "tiny", "voice": "0", "input": "Busy.", "response_format": "pcm", "stream_format": "audio",
            "max_audio_ms": 60_000}
    try:
        with running(create_app(small)) as url, httpx.Client(timeout=TIMEOUT) as client:
            with client.stream("POST", f"{url}/v1/audio/speech", json=body) as running_one:
                # Keep the iterator: a dropped httpx iter_raw generator closes the connection at once,
                # the server cancels the first request, and the second could take the lane before it
                # is ever seen waiting (the CI flake of this test).
                first_chunks = running_one.iter_raw()
                next(first_chunks)
                queued_done, queued_failed = threading.Event(), []

                def queued():
                    try:
                        with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=TIMEOUT) as r:
                            assert r.status_code == 200, (r.status_code, r.read())
                            next(r.iter_raw())
                        queued_done.set()
                    except BaseException as err:  # noqa: BLE001 -- said by the wait below, not lost in the thread
                        queued_failed.append(err)

                thread = threading.Thread(target=queued, daemon=True)
                thread.start()

                def second_queued() -> bool:
                    assert not queued_failed, f"the second request failed: {queued_failed[0]!r}"
                    return small.engine.stats()["waiting"] == 1

                deadline = time.monotonic() + 30
                while not second_queued():  # what the engine holds is in the message if it never does
                    assert time.monotonic() < deadline, f"the second request never queued: {small.engine.stats()}"
                    time.sleep(0.05)
                refused = client.post(f"{url}/v1/audio/speech", json=body)
                assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["type"] == "rate_limit_error"
            thread.join(60)  # the running one closed: the queued one gets the lane, reads, closes
            assert queued_done.is_set()
            wait_for(lambda: no_blocks_held(small), 30, "both requests to free their blocks")
            metrics = client.get(f"{url}/metrics").text
            assert 'misotts_errors_total{kind="queue_full"} 1.0' in metrics
    finally:
        small.close()


def test_health_is_503_once_the_engine_stops(tts):
    other = misotts.api.TTS(tts.model, tts.tokenizer, untrained=True, _codec=tts.codec)
    other.start_engine({"max_batch": 1})
    with running(create_app(other)) as url:
        assert httpx.get(f"{url}/health").json() == {"ok": True, "state": "serving", "error": None}
        other.close()
        assert httpx.get(f"{url}/health").status_code == 503
        response = speech(url)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_stopped"


def test_models_and_metrics(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert speech(server).status_code == 200
    metrics = httpx.get(f"{server}/metrics").text
    for name in ("misotts_time_to_first_audio_seconds_count", "misotts_frames_total", "misotts_queue_depth",
                 "misotts_kv_blocks_in_use", "misotts_prefix_reused_positions_total"):
        assert name in metrics
    count = next(line for line in metrics.splitlines() if line.startswith("misotts_time_to_first_audio_seconds_count"))
    assert float(count.split()[-1]) >= 1


def test_an_api_key_is_required_when_set(tts):
    with running(create_app(tts, model_name="tiny", api_key="s3cret")) as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", timeout=60, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert httpx.post(f"{url}/v1/audio/speech", json={}).status_code == 401
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", timeout=60, max_retries=0)
        assert [m.id for m in right.models.list()] == ["tiny"]
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key


def test_a_failure_mid_stream_ends_the_stream_never_hangs(tts):
    """The engine stops after the first audio: sse ends with an error event, a raw audio stream
    ends as a broken transfer, and both end at once."""
    body = {"model": "tiny", "voice": "0", "input": "Cut short.", "response_format": "pcm", "max_audio_ms": 60_000}
    for stream_format in ("sse", "audio"):
        other = misotts.api.TTS(tts.model, tts.tokenizer, untrained=True, _codec=tts.codec)
        other.start_engine({"max_batch": 1})
        with running(create_app(other)) as url:
            with httpx.stream("POST", f"{url}/v1/audio/speech", json={**body, "stream_format": stream_format},
                              timeout=TIMEOUT) as response:
                lines = response.iter_lines() if stream_format == "sse" else response.iter_raw()
                next(lines)
                other.close()  # every running stream gets EngineStopped
                if stream_format == "sse":
                    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
                    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "engine_stopped"
                else:
                    with pytest.raises(httpx.RemoteProtocolError):
                        for _ in lines:
                            pass
