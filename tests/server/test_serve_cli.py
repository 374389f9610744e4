"""`misotts serve` in a subprocess: the port opens once the model is loaded, and it serves."""
import os
import subprocess
import sys
import time

import httpx

from misotts.server.background import free_port

START_TIMEOUT_S = 120


def test_misotts_serve_loads_then_serves(tmp_path):
    port = free_port()
    env = {**os.environ, "MISOTTS_API_KEY": "k", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "misotts", "serve", "--model", "tiny", "--device", "cpu", "--port", str(port),
           "--voices-dir", str(tmp_path / "voices"), "--max-batch", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the server did not open its port"
            try:
                health = httpx.get(f"{url}/health", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health.json()["state"] == "serving"  # the engine was up when the port opened
        body = {"model": "tiny", "voice": "0", "input": "Hi.", "response_format": "pcm", "max_audio_ms": 160}
        assert httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60).status_code == 401  # key from the env
        response = httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60, headers={"Authorization": "Bearer k"})
        assert response.status_code == 200 and len(response.content) == 2 * 1920 * 2
        assert response.headers["x-request-id"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
