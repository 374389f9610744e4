"""Who may call: keys checked at startup, the schema behind a key, a keyless server's Origin and
content-type policy; HEAD /health; 405 with Allow."""
import httpx
import pytest

from misotts.server import create_app

from .serving import running

TIMEOUT = httpx.Timeout(60.0)
BODY = {"model": "tiny", "voice": "0", "input": "Hi.", "response_format": "pcm", "max_audio_ms": 80}


@pytest.mark.parametrize("key, message", [("", "empty"), ("clé", "printable ASCII"), (" k", "printable ASCII"),
                                          ("a b", "printable ASCII"), ("k\n", "printable ASCII")])
def test_unusable_keys_are_refused_at_startup(tts, key, message):
    with pytest.raises(ValueError, match=message):
        create_app(tts, api_key=key)


def test_the_schema_is_behind_the_key(server, tts):
    assert httpx.get(f"{server}/openapi.json", timeout=TIMEOUT).status_code == 200  # keyless: open
    with running(create_app(tts, api_key="s3cret")) as url:
        for path in ("/openapi.json", "/docs", "/redoc"):
            response = httpx.get(f"{url}{path}", timeout=TIMEOUT, headers={"Authorization": "Bearer s3cret"})
            assert response.status_code == 404 and response.json()["error"]["code"] == "404", path
        # with a key, an Origin changes nothing: the key is what counts
        ok = httpx.post(f"{url}/v1/audio/speech", json=BODY, timeout=TIMEOUT,
                        headers={"Authorization": "Bearer s3cret", "Origin": "https://evil.example"})
        assert ok.status_code == 200


def test_a_keyless_server_refuses_foreign_pages_and_non_json_bodies(server):
    for origin in ("https://evil.example", "null", "http://127.0.0.1:1"):
        response = httpx.post(f"{server}/v1/audio/speech", json=BODY, timeout=TIMEOUT, headers={"Origin": origin})
        assert response.status_code == 403 and response.json()["error"]["code"] == "origin_refused", origin
    host = server.removeprefix("http://")
    same = httpx.post(f"{server}/v1/audio/speech", json=BODY, timeout=TIMEOUT, headers={"Origin": f"http://{host}"})
    assert same.status_code == 200  # a page the server itself served
    import json
    plain = httpx.post(f"{server}/v1/audio/speech", content=json.dumps(BODY), timeout=TIMEOUT,
                       headers={"Content-Type": "text/plain"})  # what a cross-site form or fetch can send
    assert plain.status_code == 415 and plain.json()["error"]["code"] == "unsupported_media_type"
    listed = httpx.get(f"{server}/v1/models", timeout=TIMEOUT, headers={"Origin": "https://evil.example"})
    assert listed.status_code == 403


def test_head_health_and_405_with_allow(server):
    head = httpx.head(f"{server}/health", timeout=TIMEOUT)
    assert head.status_code == 200 and head.content == b""
    wrong = httpx.post(f"{server}/health", timeout=TIMEOUT)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "405"
    assert set(wrong.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
    assert httpx.put(f"{server}/v1/audio/speech", timeout=TIMEOUT).headers["allow"] == "POST"


def test_a_keyless_websocket_refuses_foreign_pages(server):
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    url = server.replace("http://", "ws://") + "/v1/audio/speech/stream"
    with pytest.raises((InvalidStatus, ConnectionClosed)):
        with connect(url, origin="https://evil.example") as ws:  # cross-site WebSocket hijacking
            ws.recv(timeout=30)
    with connect(url) as ws:  # no Origin: not a browser
        ws.send('{"type": "nonsense"}')
        assert '"error"' in ws.recv(timeout=30)
