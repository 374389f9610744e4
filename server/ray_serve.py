"""The server on Ray Serve: the FastAPI app as the ingress, one warm engine per replica behind it.

    misotts serve --ray --replicas 2 --model csm-1b            # a local Ray, or --ray-address auto
    misotts serve --ray --autoscale 1:8 --model csm-1b
    serve run misotts.server.ray_serve:build_app model=csm-1b replicas=2     # or a config file

Two deployments:

- `misotts-api` (the ingress): `create_app` unchanged, over a `RemoteTTS`.  It parses requests,
  keeps the voices (a folder shared by its replicas), streams audio / SSE / WebSockets to clients,
  and turns a failed engine replica into OpenAI's error envelope (or an error event mid-stream).
  It holds no model: a CPU or two serve many engines.
- `misotts-engine`: one model and engine per replica (one GPU each, or CPU threads).  Its
  `max_ongoing_requests` is the engine's lanes, so Ray sends a generation only to a replica with a
  free lane; it autoscales on ongoing requests.

Voice affinity: each generation is routed with Ray Serve's model multiplexing, keyed by its
prompt's fixed prefix (the voice: `ray_config.affinity_key`), so a voice's requests go to the
replica whose prefix cache holds its KV while that replica has room; a voice new to the
deployment goes to the replica with the fewest voices.  Clients need nothing special: the key
comes from the request's `voice`.

A replica whose engine stops (a lost device) fails its health check and Ray replaces it; a replica
whose process dies fails only the requests it was serving, and Ray replaces it.
"""
from __future__ import annotations

import signal
import sys
import threading

import torch
from ray import serve

import misotts
from misotts.runtime.devices import DTYPES

from .app import create_app
from .ray_config import ReplicaConfig, Scaling, check_scaling, deployment_options, from_args
from .remote_tts import RemoteTTS, serve_stream
from .voice_routes import encode_clip
from .voices import VoiceStore

VOICES_PER_REPLICA = 256  # voices a replica is routed as holding; its prefix cache decides what stays warm


@serve.deployment(name="misotts-engine")
class SpeechEngine:
    def __init__(self, config: ReplicaConfig):
        if config.threads:
            torch.set_num_threads(config.threads)
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = DTYPES[config.dtype] if config.dtype else None
        self.tts = misotts.load(config.model, device=device, dtype=dtype, random_init=config.random_init,
                                codec=config.codec, tokenizer=config.tokenizer, engine=config.engine, progress=False)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def describe(self) -> dict:
        return {"config": self.tts.config, "tokenizer": self.tts.tokenizer}

    async def stream(self, text: str, context: list, params, chunking: dict):
        if voice := serve.get_multiplexed_model_id():
            await self.hold_voice(voice)
        async for item in serve_stream(self.tts, text, context, params, chunking, self.replica_id):
            yield item

    def engine_stats(self) -> dict:
        """This replica's `Engine.stats()` (lanes, queue, KV blocks)."""
        return {**self.tts.engine.stats(), "replica": self.replica_id}

    def encode(self, samples):
        return encode_clip(self.tts, samples)

    @serve.multiplexed(max_num_models_per_replica=VOICES_PER_REPLICA)
    async def hold_voice(self, key: str) -> str:
        """Marks this replica as holding the voice, for Ray's routers.  Nothing to load: the
        request carries the voice, and its first use fills the prefix cache."""
        return key

    def check_health(self) -> None:
        """Ray calls this every few seconds: an engine that stopped (its device lost) makes Ray
        replace the replica."""
        state = self.tts.engine.health()
        if not state["ok"]:
            raise RuntimeError(f"engine {state['state']}: {state['error']}")

    def __del__(self):
        if (tts := getattr(self, "tts", None)) is not None:
            tts.close()


@serve.deployment(name="misotts-api")
@serve.ingress()
class SpeechApi:
    async def __init__(self, engine, config: ReplicaConfig):
        info = await engine.describe.remote()
        self.tts, self.config = RemoteTTS(engine, info, affinity=config.voice_affinity), config

    def __serve_build_asgi_app__(self):
        c = self.config
        return create_app(self.tts, model_name=c.model_name or c.model, api_key=c.api_key,
                          voices=VoiceStore(c.voices_dir), max_turn_tokens=c.max_turn_tokens)


def build(config: ReplicaConfig, scaling: Scaling | None = None):
    """The Ray Serve application: `serve.run(build(config, scaling))`."""
    check_scaling(scaling := scaling or Scaling())
    engine, api = deployment_options(config, scaling)
    return SpeechApi.options(**api).bind(SpeechEngine.options(**engine).bind(config), config)


def build_app(args: dict):
    """Application builder for `serve run misotts.server.ray_serve:build_app key=value ...` and for
    Ray Serve config files (`args:`).  Keys: ReplicaConfig's and Scaling's fields; `autoscale` as
    "MIN:MAX"; `engine` as a dict (config files) -- e.g. model=csm-1b replicas=2 gpus=1."""
    return build(*from_args(args))


def run(config: ReplicaConfig, scaling: Scaling, host: str, port: int, address: str | None = None) -> None:
    """`misotts serve --ray`: start (or join) Ray, deploy, serve until SIGINT / SIGTERM."""
    import dataclasses

    import ray

    check_scaling(scaling)
    ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    gpus_here = ray.cluster_resources().get("GPU", 0)
    wants_cuda = (config.device or "").startswith("cuda") or (config.device is None and gpus_here > 0)
    if wants_cuda and not scaling.gpus:  # one engine per GPU
        scaling = dataclasses.replace(scaling, gpus=1.0)
    if config.device is None:
        config = dataclasses.replace(config, device="cuda" if wants_cuda else "cpu")
    if scaling.gpus and gpus_here < scaling.gpus:
        print(f"warning: each engine replica asks for {scaling.gpus:g} GPU and the Ray cluster has "
              f"{gpus_here:g}: replicas wait for GPUs", file=sys.stderr)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build(config, scaling), name="misotts", route_prefix="/")  # returns once every replica is warm
        print(f"serving {config.model} on http://{host}:{port} with Ray Serve "
              f"({_describe(scaling)}, {config.device}); Ctrl-C stops", file=sys.stderr, flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


def _describe(scaling: Scaling) -> str:
    if scaling.autoscale:
        return f"{scaling.autoscale[0]}..{scaling.autoscale[1]} engine replicas, autoscaled"
    return f"{scaling.replicas} engine replica{'s' * (scaling.replicas > 1)}"


