"""/v1/audio/speech/stream: text arrives in pieces (an LLM's tokens), audio leaves as soon as a
sentence can be spoken.

Client -> server, JSON text messages:
    {"type": "session.config", "voice": ..., "response_format": "pcm" | "opus" | "g711_ulaw" | "g711_alaw",
     "speed": ..., "seed": ..., "temperature": ..., "topk": ..., "max_audio_ms": ..., "context": [...]}
                                                  optional, before the first text
    {"type": "text.delta", "text": "Hel"}         more text
    {"type": "text.done"}                         no more text: speak the rest, then end
    {"type": "cancel"}                            barge-in: stop speaking, drop the text not yet spoken
Server -> client:
    binary frames: audio in the session's format (streaming_formats.py; pcm16 24 kHz mono by default)
    {"type": "session.ready", ...}                after the config (or at the first text)
    {"type": "segment.start", "index": i, "text": ...}  / {"type": "segment.done", "index": i, "frames": n}
    {"type": "cancelled"}                         after a cancel: the session goes on
    {"type": "error", "error": {...}}             OpenAI's envelope; a bad message does not end the session,
                                                  a failed generation does
    {"type": "done", "usage": {...}}              after text.done, when all is spoken; then the socket closes
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from .errors import ApiError, bad_request, error_kind, from_exception
from .limits import LIMITS
from .long_text import split_complete
from .shutdown import shutting_down
from .speech import (VOICE_FIELDS, Speaker, SpeechRequest, _show, check_fields, parse_delivery,
                     parse_voice_settings)
from .streaming_formats import WS_FORMATS, SegmentEncoder

log = logging.getLogger("misotts.server")
IDLE_TIMEOUT_S = 300  # a session with no message and nothing to say for this long is closed
MAX_PENDING_CHARS = 4096  # text buffered but not yet spoken, as the HTTP route's input limit


def add_stream_route(app: FastAPI, tts, voices, turns, authorize, metrics, voice_aliases=None) -> None:
    @app.websocket("/v1/audio/speech/stream")
    async def stream(websocket: WebSocket):
        try:
            authorize(websocket)
        except ApiError as err:
            metrics.errors.labels(error_kind(err)).inc()
            await websocket.close(code=1008, reason=err.message[:120])
            return
        await websocket.accept()
        await Session(websocket, tts, voices, turns, metrics, voice_aliases).run()


class Session:
    def __init__(self, websocket: WebSocket, tts, voices, turns, metrics, voice_aliases=None):
        self.ws, self.tts, self.voices, self.turns, self.metrics = websocket, tts, voices, turns, metrics
        self.voice_aliases = voice_aliases
        self.id = uuid.uuid4().hex[:16]
        self.speaker: Speaker | None = None
        self.pending = ""  # text received, not yet a whole sentence
        self.queue: asyncio.Queue = asyncio.Queue()  # sentences to speak, then None after text.done
        self.frames = self.index = self.chars = 0
        self.received = 0  # characters of text.delta taken, against the session's budget
        self.current: asyncio.Task | None = None  # the sentence being spoken
        self.format, self.speed = "pcm", 1.0

    async def run(self) -> None:
        talker, close_code = asyncio.create_task(self.talk()), 1000
        draining = getattr(self.ws.app.state, "draining", None)
        expired = asyncio.create_task(draining.expired().wait()) if draining is not None else asyncio.Future()
        try:
            while not talker.done():
                receive = asyncio.create_task(self.ws.receive())
                done, _ = await asyncio.wait({receive, talker, expired}, timeout=IDLE_TIMEOUT_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                if receive not in done:
                    receive.cancel()
                    if expired in done:  # the server's shutdown grace is over
                        await self.send_error(shutting_down())
                        close_code = 1012  # "service restart": reconnect elsewhere
                    elif not done:  # idle: nothing said, nothing to say
                        await self.send_error(ApiError(408, "the session was idle too long", code="idle_timeout"))
                    break
                message = receive.result()
                if message["type"] == "websocket.disconnect":
                    log.info("%s websocket: the client left", self.id)
                    break
                if message.get("text") is None:
                    await self.send_error(bad_request("messages are JSON text; binary frames are not read", "type"))
                    continue
                await self.handle(message["text"])
        except WebSocketDisconnect:  # a send found the client gone
            log.info("%s websocket: the client left", self.id)
        except Exception as err:  # noqa: BLE001 -- whatever it was, the client hears of it
            await self.send_error(from_exception(err))
        finally:
            expired.cancel()
            talker.cancel()  # a generation in flight is cancelled: its blocks are freed
            await asyncio.gather(talker, return_exceptions=True)
            try:
                await self.ws.close(code=close_code)
            except (RuntimeError, WebSocketDisconnect, OSError):  # already closed, or the client hung up
                pass

    async def handle(self, raw: str) -> None:
        try:
            message = json.loads(raw)
            kind = message.get("type") if isinstance(message, dict) else None
        except (ValueError, RecursionError):  # not JSON, nested too deeply, an integer over 4,300 digits
            kind = None
        if kind == "session.config":
            if self.speaker is not None:
                return await self.send_error(bad_request("session.config must come before any text", "type"))
            try:  # off the event loop: the context's audio is decoded, voices are read from disk
                config = {k: v for k, v in message.items() if k != "type"}
                self.configure(await asyncio.to_thread(self.parse_config, config))
            except ApiError as err:
                return await self.send_error(err)
        elif kind == "text.delta":
            text = message.get("text")
            if not isinstance(text, str):
                return await self.send_error(bad_request("text.delta needs a string text", "text"))
            if self.speaker is None:
                self.configure(self.parse_config({}))
            budget = getattr(self.ws.app.state, "limits", LIMITS).ws_max_session_chars
            if self.received + len(text) > budget:
                return await self.send_error(ApiError(413, f"the session's text is over {budget} "
                                                           "characters: start another", "text", "session_too_long"))
            self.received += len(text)
            self.pending += text
            if len(self.pending) > MAX_PENDING_CHARS:
                self.pending = ""
                return await self.send_error(ApiError(413, f"more than {MAX_PENDING_CHARS} characters without a "
                                                           "sentence end", "text", "input_too_long"))
            whole, self.pending = split_complete(self.pending)
            for sentence in whole:
                self.queue.put_nowait(sentence)
        elif kind == "text.done":
            if self.speaker is None:
                self.configure(self.parse_config({}))
            if self.pending.strip():
                self.queue.put_nowait(self.pending.strip())
            self.pending = ""
            self.queue.put_nowait(None)
        elif kind == "cancel":
            self.pending = ""
            while not self.queue.empty():
                self.queue.get_nowait()
            if self.current is not None:
                self.current.cancel()
            await self.ws.send_json({"type": "cancelled"})
        else:
            await self.send_error(bad_request("type must be session.config, text.delta, text.done or cancel", "type"))

    def parse_config(self, config: dict) -> tuple[str, SpeechRequest]:
        """Blocking (context audio is decoded, voices are read): called from a thread."""
        check_fields(config, {"model", "response_format", "speed", "instructions", "strict", *VOICE_FIELDS})
        fmt = config.get("response_format", "pcm")
        if fmt not in WS_FORMATS:
            raise bad_request(f"response_format must be one of {', '.join(WS_FORMATS)}, got {_show(fmt)}",
                              "response_format")
        # the first chunk's size follows the format: these, like pcm, give audio from one frame
        req = SpeechRequest(input="", response_format="opus" if fmt == "opus" else "pcm")
        parse_delivery(config, req)
        parse_voice_settings({"voice": "0", **config}, self.voices, self.tts.config, req,
                             self.tts.config.max_seq_len * 0.08, self.voice_aliases)
        return fmt, req

    def configure(self, parsed: tuple[str, SpeechRequest]) -> None:
        fmt, req = parsed
        if req.ignored:
            log.info("%s websocket: ignored %s: the model takes none", self.id, ", ".join(req.ignored))
        self.speaker, self.format, self.speed = Speaker(self.tts, req, self.turns), fmt, req.speed
        self.queue.put_nowait({"type": "session.ready", "voice": req.voice, "sample_rate": WS_FORMATS[fmt],
                               "format": fmt, "speed": req.speed, "ignored": req.ignored})

    async def talk(self) -> None:
        """Speak the queued sentences in order; a cancel stops the one in flight only."""
        while True:
            item = await self.queue.get()
            if item is None:
                usage = {"input_characters": self.chars, "output_tokens": self.frames}
                await self.ws.send_json({"type": "done", "usage": usage})
                return
            if isinstance(item, dict):
                await self.ws.send_json(item)
                continue
            self.current = asyncio.create_task(self.say(item))
            try:
                await self.current
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # the session ends, not just this sentence
                    raise
            finally:
                self.current = None

    async def say(self, text: str) -> None:
        index, self.index = self.index, self.index + 1
        self.chars += len(text)
        await self.ws.send_json({"type": "segment.start", "index": index, "text": text})
        frames, turns_before = 0, len(self.speaker.stats)
        encoder = SegmentEncoder(self.format, self.speed)
        try:
            async for chunk in self.speaker.say(text):
                frames += len(chunk.codes)
                self.metrics.frames.inc(len(chunk.codes))
                if data := encoder.add(chunk.samples):
                    await self.ws.send_bytes(data)
            if data := encoder.finish():
                await self.ws.send_bytes(data)
        except (asyncio.CancelledError, WebSocketDisconnect):
            raise
        except Exception as err:  # the generation failed: say so, and end the session
            await self.send_error(from_exception(err))
            raise
        finally:
            encoder.close()
            self.metrics.count_prefix(self.speaker.stats[turns_before:])
        self.frames += frames
        await self.ws.send_json({"type": "segment.done", "index": index, "frames": frames})

    async def send_error(self, err: ApiError) -> None:
        self.metrics.errors.labels(error_kind(err)).inc()
        try:
            await self.ws.send_json({"type": "error", **err.body()})
        except (RuntimeError, WebSocketDisconnect):
            pass

