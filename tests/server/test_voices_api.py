"""/v1/audio/voices: a clip and its transcript become a stored voice that requests can name."""
import io
import wave

import httpx
import numpy as np
import torch
from safetensors.torch import load_file

from misotts.runtime.prompt import Segment
from misotts.server.audio_formats import decode_audio
from misotts.server.voices import VoiceStore

from .serving import expected_pcm

TIMEOUT = httpx.Timeout(60.0)
TRANSCRIPT = "Hello, I am Anna."


def wav_bytes(seconds: float = 1.0, rate: int = 16_000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (np.sin(2 * np.pi * 220 * t) * 0.3 * 32767).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return out.getvalue()


def reused_total(url) -> float:
    metrics = httpx.get(f"{url}/metrics").text.splitlines()
    return float(next(line for line in metrics if line.startswith("misotts_prefix_reused_positions_total")).split()[-1])


def upload(url, name="anna", data=None, transcript=TRANSCRIPT, speaker="2"):
    return httpx.post(f"{url}/v1/audio/voices", timeout=TIMEOUT,
                      files={"file": ("ref.wav", wav_bytes() if data is None else data, "audio/wav")},
                      data={"name": name, "transcript": transcript, "speaker": speaker})


def test_a_registered_voice_is_stored_listed_used_reused_and_deleted(server, tts, voices_dir):
    created = upload(server)
    assert created.status_code == 201, created.text
    info = created.json()
    assert info["id"] == "anna" and info["speaker"] == 2 and info["transcript"] == TRANSCRIPT
    codes = load_file(voices_dir / "anna.safetensors")["codes"]
    # encoded once, from the clip resampled to 24 kHz
    assert torch.equal(codes, tts.codec.encode(decode_audio(wav_bytes())))
    assert info["frames"] == codes.shape[0] == 13
    assert [v.name for v in VoiceStore(voices_dir).list()] == ["anna"]  # on disk, for the next process
    assert [v["id"] for v in httpx.get(f"{server}/v1/audio/voices").json()["data"]] == ["anna"]
    assert upload(server).status_code == 409

    body = {"model": "tiny", "voice": "anna", "input": "Now I speak.", "response_format": "pcm", "seed": 4,
            "max_audio_ms": 160}
    first = httpx.post(f"{server}/v1/audio/speech", json=body, timeout=TIMEOUT)
    assert first.status_code == 200
    context = [Segment(2, TRANSCRIPT, codes=codes)]
    assert first.content == expected_pcm(tts, "Now I speak.", speaker=2, context=context, seed=4, max_audio_ms=160)
    reused_before = reused_total(server)
    again = httpx.post(f"{server}/v1/audio/speech", json=body, timeout=TIMEOUT)
    assert again.content == first.content
    # the voice's prompt (its transcript and 13 frames: 2 full blocks of 16) comes from the prefix cache
    assert int(again.headers["x-prefix-reused-positions"]) >= 32
    assert reused_total(server) - reused_before == int(again.headers["x-prefix-reused-positions"])

    assert httpx.delete(f"{server}/v1/audio/voices/anna").json()["deleted"] is True
    assert httpx.get(f"{server}/v1/audio/voices/anna").status_code == 404
    assert httpx.delete(f"{server}/v1/audio/voices/anna").status_code == 404
    refused = httpx.post(f"{server}/v1/audio/speech", json=body, timeout=TIMEOUT)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "voice"
    assert list(voices_dir.iterdir()) == []  # nothing left behind, no temporary files


def test_bad_uploads_are_400s_naming_the_field(server):
    for kwargs, param in [(dict(name="../x"), "name"), (dict(name="123"), "name"), (dict(name="anna\n"), "name"),
                          (dict(speaker="\u00b2"), "speaker"), (dict(speaker="1" * 5000), "speaker"), (dict(transcript=" "), "transcript"),
                          (dict(speaker="x"), "speaker"), (dict(data=b"not audio"), "file"),
                          (dict(data=wav_bytes(0.1)), "file"), (dict(data=wav_bytes(60)), "file")]:
        response = upload(server, **kwargs)
        assert response.status_code == 400, (kwargs.keys(), response.text)
        assert response.json()["error"]["param"] == param
