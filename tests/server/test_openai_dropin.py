"""What a client written for OpenAI's speech API gets by default: streamed audio in every format,
exact sample counts, `speed`, `instructions` and every built-in voice name of the installed SDK."""
import asyncio
import io
import logging
import typing
from contextlib import aclosing

import av
import httpx
import numpy as np
import openai
import pytest
import soxr
from openai.types.audio import speech_create_params

from misotts.server import create_app
from misotts.server.audio_formats import Encoder
from misotts.server.speech import OPENAI_VOICES, Speaker, Turns, parse_speech, speak
from misotts.server.stretch import stretch_chunks
from misotts.server.voices import VoiceStore

from .serving import decode, expected_pcm, no_blocks_held, running, wait_for
from .test_voices_api import upload

FRAME = 1920
TIMEOUT = httpx.Timeout(60.0)
FORMATS = ("pcm", "wav", "mp3", "aac", "opus", "flac")


def body(**fields):
    return {"model": "tiny", "voice": "0", "input": "Hello there.", "max_audio_ms": 320, "seed": 1, **fields}


def decoded_so_far(data: bytes, fmt: str) -> int:
    """24 kHz samples in the bytes received so far (a cut-off file decodes up to its cut)."""
    if fmt == "pcm":
        return len(data) // 2
    if fmt == "wav":
        return max(len(data) - 44, 0) // 2
    n = 0
    try:
        with av.open(io.BytesIO(data)) as container:
            for frame in container.decode(audio=0):
                n += frame.samples * 24_000 // frame.sample_rate
    except (av.FFmpegError, IndexError, EOFError):
        pass  # the cut: what decoded before it counts
    return n


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_streams_by_default(server, tts, fmt):
    """No stream_format (OpenAI's default, `audio`): a chunked body whose first frame of audio
    arrives while the request is still generating (750 frames asked, far from made)."""
    before = tts.engine.stats()["frames_run"]
    with httpx.stream("POST", f"{server}/v1/audio/speech", json=body(response_format=fmt, max_audio_ms=60_000),
                      timeout=TIMEOUT) as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers and response.headers["transfer-encoding"] == "chunked"
        data = b""
        for part in response.iter_raw():
            data += part
            if decoded_so_far(data, fmt) >= FRAME:
                break
        assert decoded_so_far(data, fmt) >= FRAME
    wait_for(lambda: no_blocks_held(tts), 30, "the request to be cancelled")
    assert tts.engine.stats()["frames_run"] - before < 300  # it had not run to its end


def test_stream_format_none_is_one_file_with_its_length(server, tts):
    response = httpx.post(f"{server}/v1/audio/speech", json=body(response_format="pcm", stream_format="none"),
                          timeout=TIMEOUT)
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.content == expected_pcm(tts, "Hello there.", seed=1, max_audio_ms=320)


# What the containers that cannot say "drop these" add, in 24 kHz samples: the encoder's delay in
# front (LAME 576 + the mp3 decoder's 529; AAC's 1,024 priming) and the last frame's padding.
STREAMED_MP3_DELAY, MP3_FRAME = 1105, 576
AAC_DELAY, AAC_FRAME = 1024, 1024


def lag_of(decoded: np.ndarray, reference: np.ndarray) -> int:
    """Where the reference sits in the decoded audio: the cross-correlation's peak."""
    n = len(reference)
    corr = np.correlate(np.pad(decoded, (0, max(0, n + 4096 - len(decoded)))), reference, "valid")
    return int(np.argmax(corr))


@pytest.mark.parametrize("fmt", ["wav", "mp3", "aac", "opus", "flac"])
@pytest.mark.parametrize("stream", ["none", "audio"])
def test_encoded_replies_decode_to_the_samples_of_pcm(server, tts, fmt, stream):
    """The decoded reply has pcm's sample count and starts where pcm starts; where the container
    cannot declare the encoder's delay and padding (a streamed mp3, ADTS aac), it has exactly the
    documented extra samples, the audio starting after the documented delay."""
    pcm = np.frombuffer(expected_pcm(tts, "Hello there.", seed=1, max_audio_ms=320), "<i2") / 32767.0
    response = httpx.post(f"{server}/v1/audio/speech", json=body(response_format=fmt, stream_format=stream),
                          timeout=TIMEOUT)
    assert response.status_code == 200
    rate, samples = decode(response.content)
    if rate != 24_000:  # Ogg Opus decodes at 48 kHz: exactly twice the samples
        assert fmt == "opus" and rate == 48_000 and len(samples) == 2 * len(pcm)
        samples = soxr.resample(samples, rate, 24_000)
    delay, n = 0, len(pcm)
    if fmt == "mp3" and stream == "audio":
        delay, n = STREAMED_MP3_DELAY, -(-(len(pcm) + STREAMED_MP3_DELAY) // MP3_FRAME) * MP3_FRAME
    if fmt == "aac":
        delay, n = AAC_DELAY, -(-(len(pcm) + AAC_DELAY) // AAC_FRAME) * AAC_FRAME
    assert len(samples) == n
    assert lag_of(samples, pcm) == delay


def test_speed_stretches_the_audio_streamed_or_whole(server, tts):
    pcm = expected_pcm(tts, "Hello there.", seed=1, max_audio_ms=320)
    for speed in (0.5, 2.0):
        streamed = httpx.post(f"{server}/v1/audio/speech", json=body(response_format="pcm", speed=speed),
                              timeout=TIMEOUT)
        whole = httpx.post(f"{server}/v1/audio/speech",
                           json=body(response_format="pcm", speed=speed, stream_format="none"), timeout=TIMEOUT)
        assert streamed.status_code == 200 and streamed.content == whole.content
        assert len(streamed.content) // 2 == round(len(pcm) // 2 / speed)
        assert streamed.content != pcm[: len(streamed.content)]


def test_instructions_are_ignored_and_said_so_unless_strict(server, tts, caplog):
    with caplog.at_level(logging.INFO, logger="misotts.server"):
        response = httpx.post(f"{server}/v1/audio/speech",
                              json=body(response_format="pcm", instructions="Speak like a pirate."), timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["x-misotts-ignored-fields"] == "instructions"
    assert response.content == expected_pcm(tts, "Hello there.", seed=1, max_audio_ms=320)
    assert any("ignored instructions" in r.getMessage() for r in caplog.records)
    strict = httpx.post(f"{server}/v1/audio/speech", json=body(instructions="Whisper.", strict=True), timeout=TIMEOUT)
    assert strict.status_code == 400 and strict.json()["error"]["param"] == "instructions"
    plain = httpx.post(f"{server}/v1/audio/speech", json=body(response_format="pcm"), timeout=TIMEOUT)
    assert "x-misotts-ignored-fields" not in plain.headers


def sdk_voices() -> list[str]:
    """The built-in voice names of the installed openai package's speech request type."""
    names = []
    for arg in typing.get_args(speech_create_params.Voice):
        names += [a for a in typing.get_args(arg) if isinstance(a, str)]
    return names


def test_every_voice_name_the_sdk_ships_is_a_speaker(server, tts):
    names = sdk_voices()
    assert {"alloy", "marin", "cedar"} <= set(names)
    assert set(names) <= set(OPENAI_VOICES)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60, max_retries=0)
    for name in names:
        response = client.audio.speech.create(model="tiny", voice=name, input="Hi.", response_format="pcm",
                                              extra_body={"max_audio_ms": 80})
        assert len(response.content) == 2 * FRAME, name
    # marin and cedar are the speakers after the first eleven
    for name, speaker in (("marin", 11), ("cedar", 12)):
        response = client.audio.speech.create(model="tiny", voice=name, input="Hi.", response_format="pcm",
                                              extra_body={"max_audio_ms": 160, "seed": 4})
        assert response.content == expected_pcm(tts, "Hi.", speaker=speaker, seed=4, max_audio_ms=160)


def test_built_in_names_cannot_be_registered_but_can_be_aliased(tts, tmp_path):
    store = VoiceStore(tmp_path)
    with running(create_app(tts, model_name="tiny", voices=store)) as url:
        refused = upload(url, name="alloy")
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "reserved_name"
        assert upload(url, name="bella").status_code == 201
    with running(create_app(tts, model_name="tiny", voices=store, voice_aliases={"alloy": "bella"})) as url:
        aliased = httpx.post(f"{url}/v1/audio/speech", json=body(voice="alloy", response_format="pcm"),
                             timeout=TIMEOUT)
        named = httpx.post(f"{url}/v1/audio/speech", json=body(voice="bella", response_format="pcm"),
                           timeout=TIMEOUT)
        speaker0 = httpx.post(f"{url}/v1/audio/speech", json=body(voice="ash", response_format="pcm"),
                              timeout=TIMEOUT)
    assert aliased.content == named.content != expected_pcm(tts, "Hello there.", speaker=0, seed=1, max_audio_ms=320)
    assert speaker0.content == expected_pcm(tts, "Hello there.", speaker=1, seed=1, max_audio_ms=320)
    with pytest.raises(ValueError):
        create_app(tts, voice_aliases={"bella": "alloy"})


def test_request_defaults_fill_what_a_request_lacks(tts):
    with running(create_app(tts, model_name="tiny", request_defaults={"seed": 5, "max_audio_ms": 240})) as url:
        plain = httpx.post(f"{url}/v1/audio/speech", json={"model": "tiny", "voice": "0", "input": "Hi.",
                                                           "response_format": "pcm"}, timeout=TIMEOUT)
        own = httpx.post(f"{url}/v1/audio/speech", json={"model": "tiny", "voice": "0", "input": "Hi.",
                                                         "response_format": "pcm", "seed": 6}, timeout=TIMEOUT)
    assert plain.content == expected_pcm(tts, "Hi.", seed=5, max_audio_ms=240)
    assert own.content == expected_pcm(tts, "Hi.", seed=6, max_audio_ms=240)  # the request's own field wins
    for bad in ({"colour": "red"}, {"seed": -1}):
        with pytest.raises(ValueError):
            create_app(tts, request_defaults=bad)


def test_serve_checks_its_voice_aliases_before_loading(capsys):
    from misotts.cli import main

    for bad in ("alloy", "bella=anna", "alloy="):
        assert main(["serve", "--voice-alias", bad]) != 0
        assert "--voice-alias takes NAME=VOICE" in capsys.readouterr().err


@pytest.mark.parametrize("fmt, speed", [("pcm", 1.0), ("opus", 1.0), ("mp3", 1.0), ("aac", 1.0), ("flac", 1.0),
                                         ("pcm", 0.5), ("pcm", 1.25), ("pcm", 2.0), ("wav", 1.5)])
def test_the_first_chunk_already_decodes_to_audio(tts, fmt, speed):
    """One frame where the format gives its audio back at once, two where an encoder's lookahead,
    a flac block or the time stretch needs more: either way the first chunk's bytes decode to
    audio, so a client hears something after 80 or 160 ms, not after the second chunk's 400."""
    req = parse_speech(body(response_format=fmt, speed=speed, max_audio_ms=800), None, tts.config)

    async def first_chunk():
        chunks = stretch_chunks(speak(Speaker(tts, req, Turns.for_model(tts))), req.speed)
        async with aclosing(chunks):
            return await anext(chunks)

    chunk = asyncio.run(first_chunk())
    assert len(chunk.codes) == (1 if fmt in ("pcm", "opus") and speed == 1.0 else 2)
    encoder = Encoder(fmt)
    try:
        assert decoded_so_far(encoder.add(chunk.samples), fmt) >= 256  # a WSOLA hop or a codec frame at least
    finally:
        encoder.close()
