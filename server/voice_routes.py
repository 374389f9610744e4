"""/v1/audio/voices: register a voice from an audio file and its transcript, list, get, delete."""
from __future__ import annotations

import asyncio

import torch
from fastapi import FastAPI, Request

from .audio_input import AudioTooLong, decode_capped
from .errors import ApiError, bad_request
from .voices import NAME, VoiceExists

MAX_UPLOAD_BYTES = 25 * 2**20  # as OpenAI's audio uploads
MIN_VOICE_S = 0.5


def add_voice_routes(app: FastAPI, tts, voices, authorize) -> None:
    # A voice rides in every prompt that uses it: it may fill at most a quarter of the window.
    max_frames = tts.config.max_seq_len // 4

    @app.post("/v1/audio/voices", status_code=201)
    async def create_voice(request: Request):
        authorize(request)
        form = await request.form(max_part_size=MAX_UPLOAD_BYTES)
        name, transcript, upload = form.get("name"), form.get("transcript"), form.get("file")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise bad_request("name must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
                              "name")
        if name.isdigit():
            raise bad_request("a voice name cannot be all digits (those are speaker ids)", "name")
        if not isinstance(transcript, str) or not transcript.strip():
            raise bad_request("transcript is required: the words spoken in the file", "transcript")
        speaker = form.get("speaker", "0")
        if not isinstance(speaker, str) or not (speaker.isascii() and speaker.isdigit() and len(speaker) <= 5) \
                or int(speaker) > 65535:
            raise bad_request("speaker must be an integer id in 0..65535", "speaker")
        if upload is None or isinstance(upload, str):
            raise bad_request("file is required: an audio file (WAV, MP3, FLAC, ...)", "file")
        data = await upload.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise ApiError(413, f"the file is over {MAX_UPLOAD_BYTES >> 20} MB", "file", "file_too_large")
        if voices.get(name) is not None:
            raise _exists(name)
        try:  # decoding stops at the longest clip a voice may be
            samples = await asyncio.to_thread(decode_capped, data, max_frames / 12.5)
            seconds = samples.numel() / 24_000
        except AudioTooLong:
            seconds = float("inf")
        except Exception as err:  # noqa: BLE001 -- whatever FFmpeg says about a file it cannot read
            raise bad_request(f"could not read the audio file: {err}", "file", "invalid_audio")
        if seconds < MIN_VOICE_S or seconds * 12.5 > max_frames:
            shown = f"over {max_frames / 12.5:.0f}" if seconds == float("inf") else f"{seconds:.1f}"
            raise bad_request(f"the clip is {shown} s; a voice takes {MIN_VOICE_S}..{max_frames / 12.5:.0f} s",
                              "file", "invalid_audio")
        codes = await asyncio.to_thread(encode_clip, tts, samples)
        try:
            voice = await asyncio.to_thread(voices.add, name, int(speaker), transcript.strip(), codes)
        except VoiceExists:  # registered meanwhile (by another request, or another replica)
            raise _exists(name) from None
        return voice.info()

    @app.get("/v1/audio/voices")
    async def list_voices(request: Request):
        authorize(request)
        return {"object": "list", "data": [v.info() for v in await asyncio.to_thread(voices.list)]}

    @app.get("/v1/audio/voices/{name}")
    async def get_voice(request: Request, name: str):
        authorize(request)
        voice = await asyncio.to_thread(voices.get, name)
        if voice is None:
            raise ApiError(404, f"no voice named {name!r}", "name", "voice_not_found")
        return voice.info()

    @app.delete("/v1/audio/voices/{name}")
    async def delete_voice(request: Request, name: str):
        authorize(request)
        if not await asyncio.to_thread(voices.delete, name):
            raise ApiError(404, f"no voice named {name!r}", "name", "voice_not_found")
        return {"id": name, "object": "voice", "deleted": True}


def _exists(name: str) -> ApiError:
    return ApiError(409, f"a voice named {name!r} exists: DELETE it first", "name", "voice_exists")


def encode_clip(tts, samples: torch.Tensor) -> torch.Tensor:
    """24 kHz mono samples -> Mimi codes [frames, n] on the CPU."""
    with torch.inference_mode():
        return tts.codec.encode(samples.to(tts.device)).cpu()
