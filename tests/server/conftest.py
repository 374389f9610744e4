"""The server tests' shared TTS and server (tiny, random weights, CPU)."""
import pytest

for _extra in ("fastapi", "uvicorn", "av", "httpx", "websockets"):  # the [server] and [test] extras
    pytest.importorskip(_extra)  # without one, the whole folder skips (a bare GPU machine)

import misotts  # noqa: E402
from misotts.server import create_app  # noqa: E402
from misotts.server.voices import VoiceStore  # noqa: E402

from .serving import running  # noqa: E402


@pytest.fixture(scope="session")
def tts():
    tts = misotts.load("tiny", device="cpu", progress=False, engine={"max_batch": 8, "max_waiting": 64,
                                                                "wait_timeout_s": 120})  # a slow CI runner queues long
    yield tts
    tts.close()


@pytest.fixture(scope="session")
def voices_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("voices")


@pytest.fixture(scope="session")
def server(tts, voices_dir):
    # a small turn budget, so that a few sentences already make a long input
    app = create_app(tts, model_name="tiny", voices=VoiceStore(voices_dir), max_turn_tokens=40)
    with running(app) as url:
        yield url


@pytest.fixture(autouse=True)
def _tiny_matmuls_on_one_thread(one_thread):
    yield
