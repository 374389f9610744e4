"""/v1/audio/speech/stream over a real WebSocket (the `websockets` package's client)."""
import json

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from misotts.runtime.prompt import Segment, mimi_codes
from misotts.server import create_app

from .serving import expected_pcm, no_blocks_held, running, wait_for

RECV_S = 60


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/v1/audio/speech/stream"


def messages_until(ws, kind: str):
    """(JSON messages, audio bytes) received up to and including the first message of `kind`."""
    events, audio = [], b""
    while True:
        message = ws.recv(timeout=RECV_S)
        if isinstance(message, bytes):
            audio += message
            continue
        events.append(json.loads(message))
        if events[-1]["type"] == kind:
            return events, audio


def test_sentences_are_spoken_as_soon_as_they_are_complete(server, tts):
    with connect(ws_url(server)) as ws:
        ws.send(json.dumps({"type": "session.config", "voice": "1", "seed": 5, "max_audio_ms": 160}))
        ws.send(json.dumps({"type": "text.delta", "text": "Hello the"}))
        ws.send(json.dumps({"type": "text.delta", "text": "re. How are"}))
        # the first sentence is spoken before any more text comes
        events, first_audio = messages_until(ws, "segment.done")
        assert [e["type"] for e in events] == ["session.ready", "segment.start", "segment.done"]
        assert events[1]["text"] == "Hello there." and len(first_audio) == 2 * 1920 * 2
        ws.send(json.dumps({"type": "text.delta", "text": " you? Fi"}))
        ws.send(json.dumps({"type": "text.delta", "text": "ne"}))
        ws.send(json.dumps({"type": "text.done"}))
        events, rest = messages_until(ws, "done")
    said = [e["text"] for e in events if e["type"] == "segment.start"]
    assert said == ["How are you?", "Fine"]
    assert events[-1]["usage"]["output_tokens"] == 6
    # each sentence is a turn after the ones before, as a conversation
    expected, context = b"", []
    for i, text in enumerate(["Hello there.", "How are you?", "Fine"]):
        kwargs = dict(speaker=1, context=context, seed=5 + i, max_audio_ms=160)
        expected += expected_pcm(tts, text, **kwargs)
        context = context + [Segment(1, text, codes=mimi_codes(tts.generate(text, **kwargs).codes))]
    assert first_audio + rest == expected


def test_cancel_stops_speaking_frees_the_blocks_and_the_session_goes_on(server, tts):
    with connect(ws_url(server)) as ws:
        ws.send(json.dumps({"type": "session.config", "max_audio_ms": 60_000}))  # 750 frames: minutes here
        ws.send(json.dumps({"type": "text.delta", "text": "A long sentence. And another one. "}))
        while not isinstance(ws.recv(timeout=RECV_S), bytes):
            pass
        ws.send(json.dumps({"type": "cancel"}))
        events, _ = messages_until(ws, "cancelled")
        assert "segment.done" not in [e["type"] for e in events]
        wait_for(lambda: no_blocks_held(tts), 30, "the cancelled sentence to free its blocks")
        ws.send(json.dumps({"type": "nonsense"}))  # still answering; the second sentence was dropped
        events, audio = messages_until(ws, "error")
        assert events[-1]["error"]["param"] == "type" and audio == b""
        assert [e["type"] for e in events] == ["error"]


def test_bad_messages_are_error_messages_and_leaving_frees_the_blocks(server, tts):
    with connect(ws_url(server)) as ws:
        ws.send("not json")
        assert json.loads(ws.recv(timeout=RECV_S))["error"]["param"] == "type"
        ws.send(b"\x00\x01")
        assert json.loads(ws.recv(timeout=RECV_S))["error"]["param"] == "type"
        ws.send(json.dumps({"type": "session.config", "voice": "nobody"}))
        assert json.loads(ws.recv(timeout=RECV_S))["error"]["param"] == "voice"
        ws.send(json.dumps({"type": "session.config", "response_format": "mp3"}))
        assert json.loads(ws.recv(timeout=RECV_S))["error"]["param"] == "response_format"
        ws.send(json.dumps({"type": "text.delta", "text": 5}))
        assert json.loads(ws.recv(timeout=RECV_S))["error"]["param"] == "text"
        ws.send(json.dumps({"type": "session.config", "max_audio_ms": 60_000}))
        ws.send(json.dumps({"type": "text.delta", "text": "Going on and on. "}))
        while not isinstance(ws.recv(timeout=RECV_S), bytes):
            pass
    # the client left mid-sentence
    wait_for(lambda: no_blocks_held(tts), 30, "the abandoned sentence to free its blocks")


def test_a_key_is_required_when_set(tts):
    with running(create_app(tts, api_key="s3cret")) as url:
        with pytest.raises((InvalidStatus, ConnectionClosed)):
            with connect(ws_url(url)) as ws:
                ws.recv(timeout=RECV_S)
        with connect(ws_url(url), additional_headers={"Authorization": "Bearer s3cret"}) as ws:
            ws.send(json.dumps({"type": "nonsense"}))
            assert json.loads(ws.recv(timeout=RECV_S))["type"] == "error"
