"""The server on a local Ray Serve: two engine replicas of `tiny` (CPU) behind one port.

Each audio check compares against `tts.generate` with the same seed: the replicas load the same
seeded random weights as the test's own TTS.  Generations that share a replica's batch may round
differently in the last bit of a float; pcm16 is compared within MAX_LSB (differing seeds differ
by thousands).  Every wait is bounded; a module's deployments are removed at its end.
"""
import base64
import json
import os
import threading
import time

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect

from misotts.runtime.prompt import Segment, mimi_codes
from misotts.server.background import free_port
from misotts.server.voices import VoiceStore

from .serving import expected_pcm
from .test_voices_api import upload

ray = pytest.importorskip("ray")  # the [ray] extra; the test extra installs it
from ray import serve  # noqa: E402

from misotts.server.ray_config import ReplicaConfig, Scaling  # noqa: E402
from misotts.server.ray_serve import build  # noqa: E402

pytestmark = pytest.mark.ray
TIMEOUT = httpx.Timeout(120.0)
MAX_LSB = 2
LANES = 4
REPLACED_WITHIN_S = 120


@pytest.fixture(scope="module")
def ray_url(tmp_path_factory):
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ray-voices"))


def config(voices_dir, **kw) -> ReplicaConfig:
    return ReplicaConfig(model="tiny", device="cpu", engine={"max_batch": LANES, "wait_timeout_s": 120},
                         voices_dir=voices_dir, threads=1, **kw)


@pytest.fixture(scope="module")
def url(ray_url, voices_dir):
    serve.run(build(config(voices_dir), Scaling(replicas=2)), name="misotts", route_prefix="/")
    return ray_url


def speech(url, **fields):
    body = {"model": "tiny", "voice": "0", "input": "Hello there.", "response_format": "pcm", "max_audio_ms": 160,
            **fields}
    return httpx.post(f"{url}/v1/audio/speech", json=body, timeout=TIMEOUT)


def close_pcm(a: bytes, b: bytes) -> bool:
    x, y = np.frombuffer(a, "<i2").astype(int), np.frombuffer(b, "<i2").astype(int)
    return x.shape == y.shape and int(np.abs(x - y).max(initial=0)) <= MAX_LSB


def register(url, name: str) -> None:
    created = upload(url, name)  # speaker 2
    assert created.status_code == 201, created.text


def test_concurrent_streams_are_spread_over_both_replicas_and_each_equals_generate(url, tts):
    # 6 streams for 2 x 4 lanes: Ray's router balances them, and one replica cannot take them all.
    seeds, results = range(6), {}

    def stream(seed):
        body = {"model": "tiny", "voice": "1", "input": "Streaming now.", "response_format": "pcm",
                "stream_format": "audio", "seed": seed, "max_audio_ms": 400}
        with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=TIMEOUT) as r:
            results[seed] = (r.status_code, r.headers.get("x-misotts-replica"), r.read())

    threads = [threading.Thread(target=stream, args=(seed,)) for seed in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(results) == list(seeds)
    assert {status for status, _, _ in results.values()} == {200}
    assert len({replica for _, replica, _ in results.values()}) == 2
    for seed, (_, _, pcm) in results.items():
        assert close_pcm(pcm, expected_pcm(tts, "Streaming now.", speaker=1, seed=seed, max_audio_ms=400)), seed
    assert not close_pcm(results[0][2], results[1][2])  # the comparison can tell seeds apart


def reuse_by_request(url, voice: str, n: int, prefix: str = "") -> list[tuple[str, int]]:
    """(replica, reused prompt positions) of n requests for the voice, one after another."""
    out = []
    for i in range(n):
        r = httpx.post(f"{url}{prefix}/v1/audio/speech", timeout=TIMEOUT,
                       json={"model": "tiny", "voice": voice, "input": f"Sentence number {i}.",
                             "response_format": "pcm", "seed": i, "max_audio_ms": 80})
        assert r.status_code == 200, r.text
        out.append((r.headers["x-misotts-replica"], int(r.headers["x-prefix-reused-positions"])))
        if i == 0:
            time.sleep(1.0)  # the replica reports the voice to Ray's routers (asynchronously)
    return out


def test_a_voice_stays_on_the_replica_whose_prefix_cache_holds_it(url, tts, voices_dir):
    register(url, "vera")
    served = reuse_by_request(url, "vera", 5)
    assert len({replica for replica, _ in served}) == 1, served
    assert served[0][1] == 0 and all(reused >= 16 for _, reused in served[1:]), served  # the voice's KV, reused
    # and the audio is the voice's: the same as generate with the voice as context
    r = speech(url, voice="vera", input="Last one.", seed=9, max_audio_ms=240)
    voice = VoiceStore(voices_dir).get("vera")
    assert close_pcm(r.content, expected_pcm(tts, "Last one.", speaker=2, context=[voice.segment()], seed=9,
                                             max_audio_ms=240))


def test_without_affinity_a_voice_is_prefilled_again_on_each_replica(ray_url, voices_dir):
    serve.run(build(config(voices_dir, voice_affinity=False), Scaling(replicas=2)), name="plain",
              route_prefix="/plain")
    try:
        register(ray_url + "/plain", "otto")
        served = reuse_by_request(ray_url, "otto", 12, prefix="/plain")
        replicas = {replica for replica, _ in served}
        assert len(replicas) == 2, served  # any replica; 12 on one would be a 1-in-2048 draw
        # each replica's first request for the voice prefilled it: no reuse there
        firsts = {}
        for replica, reused in served:
            firsts.setdefault(replica, reused)
        assert list(firsts.values()) == [0, 0], served
    finally:
        serve.delete("plain")


def test_a_websocket_session_passes_through_and_keeps_its_turns_together(url, tts):
    ws_url = url.replace("http://", "ws://") + "/v1/audio/speech/stream"
    audio, events = b"", []
    with connect(ws_url, open_timeout=60) as ws:
        ws.send(json.dumps({"type": "session.config", "voice": "1", "seed": 5, "max_audio_ms": 160}))
        ws.send(json.dumps({"type": "text.delta", "text": "Hello there. How are you?"}))
        ws.send(json.dumps({"type": "text.done"}))
        while not events or events[-1]["type"] != "done":
            message = ws.recv(timeout=120)
            if isinstance(message, bytes):
                audio += message
            else:
                events.append(json.loads(message))
    expected, context = b"", []
    for i, text in enumerate(["Hello there.", "How are you?"]):
        kwargs = dict(speaker=1, context=context, seed=5 + i, max_audio_ms=160)
        expected += expected_pcm(tts, text, **kwargs)
        context = context + [Segment(1, text, codes=mimi_codes(tts.generate(text, **kwargs).codes))]
    assert close_pcm(audio, expected)


def replica_pid(replica_id: str) -> int:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].endswith(f"#misotts-engine#{replica_id}")]
    assert len(names) == 1, names
    actor = ray.get_actor(names[0], namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30)


def sse(url, results: dict, key, **fields):
    """One SSE request's (replica, events) into results[key]; a broken transfer is recorded too."""
    body = {"model": "tiny", "input": "A long answer.", "response_format": "pcm", "stream_format": "sse",
            "max_audio_ms": 4000, **fields}
    events, replica = [], None
    try:
        with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=TIMEOUT) as r:
            replica = r.headers.get("x-misotts-replica")
            results[key] = (replica, events)
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    except httpx.HTTPError as err:
        events.append({"type": "transport_error", "error": repr(err)})
    results[key] = (replica, events)


def test_a_killed_replica_fails_only_its_requests_with_the_envelope_and_is_replaced(url):
    register(url, "kim")
    victim = reuse_by_request(url, "kim", 1)[0][0]
    # On the victim (by the voice's affinity): an SSE stream and a whole-file request.
    results, threads = {}, []
    whole = {}

    def whole_file():
        r = speech(url, voice="kim", input="A long answer.", max_audio_ms=4000, stream_format="none")
        whole["response"] = (r.status_code, r.headers.get("content-type"), r.content)

    threads.append(threading.Thread(target=sse, args=(url, results, "victim"), kwargs={"voice": "kim"}))
    threads.append(threading.Thread(target=whole_file))
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not results.get("victim", (None, []))[1]:
        assert time.monotonic() < deadline, "the victim's stream did not start"
        time.sleep(0.05)
    # The others: plain requests, which Ray's router sends to the less loaded replica.
    for i in range(3):
        threads.append(threading.Thread(target=sse, args=(url, results, i), kwargs={"voice": "1", "seed": i}))
        threads[-1].start()
    while not all(results.get(i, (None, []))[1] for i in range(3)):
        assert time.monotonic() < deadline, "the other streams did not start"
        time.sleep(0.05)
    assert results["victim"][0] == victim
    survivors = [i for i in range(3) if results[i][0] != victim]
    assert survivors, results

    os.kill(replica_pid(victim), 9)
    for t in threads:
        t.join(180)
    # The victim's stream ends with an error event in OpenAI's envelope; its whole-file request is a 503.
    last = results["victim"][1][-1]
    assert last["type"] == "error" and last["error"]["code"] == "engine_stopped", last
    status, content_type, content = whole["response"]
    assert status == 503 and content_type == "application/json"
    assert json.loads(content)["error"]["code"] == "engine_stopped"
    for i in survivors:  # the other replica's streams complete
        assert results[i][1][-1]["type"] == "speech.audio.done", results[i][1][-1]
        audio = b"".join(base64.b64decode(e["audio"]) for e in results[i][1] if e["type"] == "speech.audio.delta")
        assert len(audio) == 50 * 1920 * 2

    # New requests succeed at once (on the survivor), and Ray brings up a replacement.
    assert speech(url).status_code == 200
    seen, deadline = set(), time.monotonic() + REPLACED_WITHIN_S
    while len(seen - {victim}) < 2:
        assert time.monotonic() < deadline, f"no replacement replica within {REPLACED_WITHIN_S} s: {seen}"
        r = speech(url, seed=len(seen))
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-misotts-replica"])
    assert victim not in seen


def test_a_full_deployment_answers_429_and_a_gone_client_frees_its_replica(ray_url, voices_dir):
    # One replica of one lane, one place in the API's queue: a third request at once is refused.
    tight = ReplicaConfig(model="tiny", device="cpu", engine={"max_batch": 1}, voices_dir=voices_dir, threads=1)
    serve.run(build(tight, Scaling(replicas=1, max_queued=1)), name="tight", route_prefix="/tight")
    try:
        results, threads = {}, []

        def request(i):
            r = httpx.post(f"{ray_url}/tight/v1/audio/speech", timeout=TIMEOUT,
                           json={"model": "tiny", "voice": "0", "input": "Wait for me.", "response_format": "pcm",
                                 "seed": i, "max_audio_ms": 2000})
            results[i] = (r.status_code, r.headers.get("retry-after"), r.content)

        for i in range(3):
            threads.append(threading.Thread(target=request, args=(i,)))
            threads[-1].start()
            time.sleep(0.5)  # in order: the lane, the queue's place, then no room
        for t in threads:
            t.join(180)
        statuses = sorted(status for status, _, _ in results.values())
        assert statuses == [200, 200, 429], [r[2][:300] for r in results.values()]
        (refused,) = [r for r in results.values() if r[0] == 429]
        assert refused[1] == "1" and json.loads(refused[2])["error"]["code"] == "queue_full"

        # A client that goes away mid-stream: the replica's engine stops its generation and frees its blocks.
        body = {"model": "tiny", "voice": "0", "input": "Never mind.", "response_format": "pcm",
                "stream_format": "audio", "max_audio_ms": 60_000}
        with httpx.stream("POST", f"{ray_url}/tight/v1/audio/speech", json=body, timeout=TIMEOUT) as r:
            assert r.status_code == 200 and next(r.iter_raw())
        engine = serve.get_deployment_handle("misotts-engine", app_name="tight")
        deadline = time.monotonic() + 10  # the whole minute of audio would take ~30 s to make here
        while True:
            stats = engine.engine_stats.remote().result(timeout_s=30)
            if stats["running"] == 0 and stats["blocks_available"] == stats["blocks_total"]:
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.2)
    finally:
        serve.delete("tight")


def engine_replicas(app: str) -> dict:
    return serve.status().applications[app].deployments["misotts-engine"].replica_states


def test_autoscaling_adds_a_replica_under_load_and_removes_it_when_idle(ray_url, voices_dir):
    # One replica of 2 lanes to start, a target of 1 ongoing request each, no delays of our own:
    # 4 streams at once make Ray add the second replica, which then serves; idle, Ray removes it.
    scaling = Scaling(autoscale=(1, 2), target_ongoing=1, upscale_delay_s=0, downscale_delay_s=0)
    serve.run(build(config(voices_dir), scaling), name="auto", route_prefix="/auto")
    try:
        assert engine_replicas("auto") == {"RUNNING": 1}
        served, deadline = set(), time.monotonic() + 150

        def stream(i):
            body = {"model": "tiny", "voice": "0", "input": "Keep going.", "response_format": "pcm",
                    "stream_format": "audio", "max_audio_ms": 4000, "seed": i}
            with httpx.stream("POST", f"{ray_url}/auto/v1/audio/speech", json=body, timeout=TIMEOUT) as r:
                assert r.status_code == 200
                served.add(r.headers["x-misotts-replica"])
                r.read()

        while len(served) < 2:  # waves of 4 streams until a second replica has served one
            assert time.monotonic() < deadline, f"no second replica within 150 s: {engine_replicas('auto')}"
            threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        deadline = time.monotonic() + 120
        while engine_replicas("auto") != {"RUNNING": 1}:  # Ray averages load over 30 s before removing
            assert time.monotonic() < deadline, f"still {engine_replicas('auto')} after 120 s idle"
            time.sleep(1)
    finally:
        serve.delete("auto")
