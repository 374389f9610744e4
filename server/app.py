"""The routes: OpenAI's speech API and ours around it (voices, health, models, metrics).

One TTS (its engine already warm) per app.  Errors leave in OpenAI's envelope (errors.py); a
request's errors before its first audio get a status code, later ones end the stream.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from misotts.chunks import Audio

from .audio_formats import MEDIA_TYPES, Encoder, encode_all
from .auth import check_api_key, foreign_origin
from .errors import ApiError, bad_request, error_kind, from_exception
from .limits import LIMITS, Limits, RequestGuard
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .shutdown import Draining, until_expired
from .speech import OPENAI_VOICES, Speaker, Turns, parse_speech, speak
from .stretch import stretch_chunks
from .ws import add_stream_route

log = logging.getLogger("misotts.server")
REUSED_HEADER, COMPUTED_HEADER = "X-Prefix-Reused-Positions", "X-Prefix-Computed-Positions"
REPLICA_HEADER = "X-Misotts-Replica"  # the engine replica that served a request (Ray Serve)
IGNORED_HEADER = "X-Misotts-Ignored-Fields"  # request fields accepted but not honoured (instructions)


def create_app(tts, *, model_name: str = "misotts", api_key: str | None = None, voices=None,
               max_turn_tokens: int | None = None, limits: Limits = LIMITS, voice_aliases: dict | None = None,
               request_defaults: dict | None = None) -> FastAPI:
    """tts: a loaded misotts.TTS; voices: a VoiceStore (None: no voice routes); api_key: required
    as `Authorization: Bearer <key>` on /v1 routes when set; voice_aliases: built-in voice names
    that speak as a registered voice instead ({"alloy": "anna"}), for clients that only send those;
    request_defaults: speech request fields a request that lacks them gets ({"seed": 7,
    "max_audio_ms": 5000}), for clients that cannot send our extensions (Pipecat, LiveKit)."""
    if api_key is not None:
        check_api_key(api_key)
    voice_aliases = dict(voice_aliases or {})
    if unknown := sorted(set(voice_aliases) - set(OPENAI_VOICES)):
        raise ValueError(f"voice aliases are for built-in voice names ({', '.join(OPENAI_VOICES)}): {unknown}")
    request_defaults = dict(request_defaults or {})
    try:  # checked now, as a request would be, so a bad default fails at start, not on every request
        parse_speech({"model": "-", "input": "-", "voice": "0", **request_defaults}, None, tts.config)
    except ApiError as err:
        raise ValueError(f"request_defaults: {err.message}") from None
    # the schema names every route: behind a key it is not served at all
    app = FastAPI(title="MisoTTS", docs_url=None, redoc_url=None, openapi_url=None if api_key else "/openapi.json")
    app.state.tts, app.state.voices, app.state.limits = tts, voices, limits
    app.state.draining = Draining()  # a GracefulServer's shutdown ends streams through it
    app.state.metrics = metrics = Metrics(tts.engine)
    turns = Turns.for_model(tts, max_turn_tokens)
    max_context_audio_s = tts.config.max_seq_len * 0.08  # what the window holds: 12.5 frames/s
    created = int(time.time())

    def authorize(request) -> None:
        if api_key is None:  # keyless: no browser page from another site (see auth.py)
            if (origin := foreign_origin(request.headers, request.headers.get("host"))) is not None:
                raise ApiError(403, f"requests from web pages of another origin ({origin[:80]}) are refused by a "
                               "server without an API key", None, "origin_refused", type="permission_error")
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "a valid API key is required: Authorization: Bearer <key>", None,
                           "invalid_api_key", type="authentication_error")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        metrics.errors.labels(error_kind(err)).inc()
        request.state.note = err.message  # RequestIds writes it in the request's one log line
        return err.response()

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, err: ClientDisconnect):  # normal life, not an error
        route = "speech" if request.url.path == "/v1/audio/speech" else "voices"
        metrics.requests.labels(route, "disconnected").inc()
        request.state.note = "the client left before its body was read"
        return Response(status_code=499)  # never sent: nobody is there

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return await api_error(request, ApiError(err.status_code, str(err.detail), code=str(err.status_code),
                                                 type="invalid_request_error", headers=err.headers))  # 405: Allow

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        log.exception("%s %s failed", _rid(request), request.url.path)
        return await api_error(request, from_exception(err))

    app.add_middleware(RequestGuard, limits=limits)  # inside RequestIds: a refused request still gets its id and log line
    app.add_middleware(RequestIds)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        engine = tts.engine
        state = engine.health() if engine is not None else {"ok": True, "state": "serving", "error": None}
        return JSONResponse(state, status_code=200 if state["ok"] else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "misotts"}]}

    @app.post("/v1/audio/speech")
    async def speech(request: Request):
        authorize(request)
        received = time.perf_counter()
        if api_key is None and not _is_json(request.headers.get("content-type", "")):
            raise ApiError(415, "the body must be sent as Content-Type: application/json", None,
                           "unsupported_media_type")
        body = await read_json(request)
        if isinstance(body, dict):
            body = {**request_defaults, **body}
        req = await asyncio.to_thread(parse_speech, body, voices, tts.config, max_context_audio_s,  # decodes audio
                                      voice_aliases)
        speaker = Speaker(tts, req, turns)
        turn_stats = speaker.stats  # each turn's stream's stats, read from the streams themselves
        chunks = until_expired(stretch_chunks(speak(speaker), req.speed), app.state.draining)
        try:  # up to the first chunk a failure is a status code: queue full, engine stopped, bad prompt
            first = await anext(chunks, None)
        except Exception as err:
            await chunks.aclose()
            raise from_exception(err)
        if first is not None:
            metrics.ttfa.observe(time.perf_counter() - received)
        first_stats = turn_stats[0] if turn_stats else None
        headers = {}
        if first_stats is not None:
            headers = {REUSED_HEADER: str(first_stats.reused_positions),
                       COMPUTED_HEADER: str(first_stats.computed_positions)}
            if first_stats.served_by:
                headers[REPLICA_HEADER] = first_stats.served_by
        if req.ignored:  # accepted for OpenAI's clients; this model cannot follow them
            headers[IGNORED_HEADER] = ",".join(req.ignored)
            log.info("%s ignored %s: the model takes none", _rid(request), ", ".join(req.ignored))
        counted = _counting(first, chunks, metrics, turn_stats)
        if req.stream_format is None:
            return await _whole_file(request, counted, req.response_format, headers, metrics)
        if req.stream_format == "audio":
            body_iter = _audio_body(request, counted, req.response_format, metrics)
            return StreamingResponse(body_iter, media_type=MEDIA_TYPES[req.response_format], headers=headers)
        input_tokens = len(tts.tokenizer.encode(req.input))
        body_iter = _sse_body(request, counted, req.response_format, input_tokens, metrics)
        return StreamingResponse(body_iter, media_type="text/event-stream", headers=headers)

    add_stream_route(app, tts, voices, turns, authorize, metrics, voice_aliases)
    if voices is not None:
        from .voice_routes import add_voice_routes

        add_voice_routes(app, tts, voices, authorize)
    return app


class RequestIds:
    """Each HTTP request gets an id (the client's X-Request-Id, or a new one): in the response's
    headers and in the log line written when it ends.  Plain ASGI, so streams pass untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")[:64]
        rid = given or uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["rid"] = rid
        start, status = time.perf_counter(), [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            note = scope["state"].get("note")
            log.info("%s %s %s -> %d in %.0f ms%s", rid, scope["method"], scope["path"], status[0],
                     (time.perf_counter() - start) * 1000, f": {note}" if note else "")


async def read_json(request: Request):
    """The body as JSON, parsed off the event loop (it may be megabytes); 400 for anything else."""
    raw = await request.body()
    try:
        return await asyncio.to_thread(json.loads, raw)
    except RecursionError:
        raise bad_request("the JSON is nested too deeply", None, "invalid_json") from None
    except ValueError as err:  # not JSON, not UTF-8, an integer over 4,300 digits
        raise bad_request(f"the body must be JSON ({str(err)[:80]})", None, "invalid_json") from None


def _is_json(content_type: str) -> bool:
    return content_type.split(";")[0].strip().lower() == "application/json"


def _rid(request: Request) -> str:
    return getattr(request.state, "rid", "-")


async def _counting(first: Audio | None, chunks, metrics, turn_stats: list):
    """The first chunk (already made) and the rest, counted in frames; at the end, every turn's
    prefix-cache positions.  Closing this closes the generation."""
    try:
        if first is not None:
            metrics.frames.inc(len(first.codes))
            yield first
        async for chunk in chunks:
            metrics.frames.inc(len(chunk.codes))
            yield chunk
    finally:
        await chunks.aclose()  # cancels the engine request (its blocks are freed at the next frame)
        metrics.count_prefix(turn_stats)


async def _whole_file(request: Request, chunks, response_format: str, headers: dict, metrics) -> Response:
    parts = []
    try:
        async for chunk in chunks:
            parts.append(chunk)
            if await request.is_disconnected():  # nobody to send the file to: stop making it
                metrics.requests.labels("speech", "disconnected").inc()
                return Response(status_code=499)
    except Exception as err:
        raise from_exception(err)
    finally:
        await chunks.aclose()
    samples = torch.cat([chunk.samples for chunk in parts]) if parts else torch.zeros(0)
    data = await asyncio.to_thread(encode_all, samples, response_format)
    metrics.requests.labels("speech", "ok").inc()
    return Response(data, media_type=MEDIA_TYPES[response_format], headers=headers)


async def _audio_body(request: Request, chunks, response_format: str, metrics):
    """Encoded bytes as chunks are made.  A failure after the headers cannot change the status:
    the stream ends without its last chunk, so the client sees a broken transfer, not a hang."""
    encoder = Encoder(response_format)
    try:
        async for chunk in chunks:
            if data := encoder.add(chunk.samples):
                yield data
            if await request.is_disconnected():
                metrics.requests.labels("speech", "disconnected").inc()
                return
        if data := encoder.finish():
            yield data
        metrics.requests.labels("speech", "ok").inc()
    except asyncio.CancelledError:  # the client left (Starlette cancels the stream): not an error
        _left(request, metrics)
        raise
    except Exception as err:
        metrics.errors.labels(error_kind(from_exception(err))).inc()
        log.warning("%s speech stream failed: %s", _rid(request), err)
        raise
    finally:
        encoder.close()
        await chunks.aclose()


async def _sse_body(request: Request, chunks, response_format: str, input_tokens: int, metrics):
    """speech.audio.delta events (base64 audio), then speech.audio.done with usage; a failure
    mid-stream becomes an error event and the end of the stream."""
    encoder, frames = Encoder(response_format), 0
    try:
        async for chunk in chunks:
            frames += len(chunk.codes)
            if data := encoder.add(chunk.samples):
                yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
            if await request.is_disconnected():
                metrics.requests.labels("speech", "disconnected").inc()
                return
        if data := encoder.finish():
            yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        usage = {"input_tokens": input_tokens, "output_tokens": frames, "total_tokens": input_tokens + frames}
        yield _event({"type": "speech.audio.done", "usage": usage})
        metrics.requests.labels("speech", "ok").inc()
    except asyncio.CancelledError:
        _left(request, metrics)
        raise
    except Exception as err:
        error = from_exception(err)
        metrics.errors.labels(error_kind(error)).inc()
        yield _event({"type": "error", **error.body()})
    finally:
        encoder.close()
        await chunks.aclose()


def _left(request: Request, metrics) -> None:
    metrics.requests.labels("speech", "disconnected").inc()
    request.state.note = "the client left mid-stream"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
