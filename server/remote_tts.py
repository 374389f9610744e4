"""The part of `misotts.TTS` that the server's app uses, served by engine replicas over Ray Serve.

The app (create_app) calls `astream`, `config`, `tokenizer`, `codec.encode` and `device`; here
each stream (a `RemoteStream`, which keeps `misotts.chunks.ChunkStream`: chunks, and its own
stats as the replica reports them) is a streaming call to one replica of the engine deployment.  The call
is keyed by its prompt's fixed prefix (the voice, or the given context), so Ray's multiplexed
routing keeps a voice on the replica whose prefix cache holds it.  A replica that dies mid-call
becomes `EngineStopped` (a 503, or an error event once streaming); a deployment with every replica
and its queue full becomes `EngineBusy` (a 429).
"""
from __future__ import annotations

import asyncio
from contextlib import aclosing, suppress
from dataclasses import fields

import torch
from ray.exceptions import RayActorError  # ActorDiedError, ActorUnavailableError and the rest
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from misotts.chunks import GenerationStats
from misotts.engine import EngineBusy, EngineStopped
from misotts.runtime.params import KEEP, GenerationParams, params_of

from .ray_config import affinity_key

STATS_FIELDS = [f.name for f in fields(GenerationStats)]


def stats_dict(stats: GenerationStats) -> dict:
    return {name: getattr(stats, name) for name in STATS_FIELDS}


class RemoteCodec:
    def __init__(self, handle):
        self.handle = handle

    def encode(self, samples: torch.Tensor) -> torch.Tensor:
        """Blocking: call it from a worker thread (the app does), not the event loop."""
        try:
            return self.handle.encode.remote(samples.cpu()).result()
        except (RayActorError, DeploymentUnavailableError) as err:
            raise EngineStopped(f"the replica encoding the clip failed: {err}") from err


class RemoteTTS:
    """info: the engine replica's `describe()` (config, tokenizer); affinity: route by prefix."""

    engine = None  # no engine in this process: /health and the metrics' gauges are the replicas' own
    device = torch.device("cpu")

    def __init__(self, handle, info: dict, affinity: bool = True):
        self.handle, self.config, self.tokenizer = handle, info["config"], info["tokenizer"]
        self.affinity = affinity
        self.codec = RemoteCodec(handle)

    def astream(self, text: str, speaker: int = KEEP, context=(), params: GenerationParams | None = None,
                *, first_chunk_frames: int = 1, chunk_frames: int = 1, **settings) -> RemoteStream:
        """`TTS.astream` on a replica: the same arguments, the settings checked here first."""
        params = params_of(params, speaker, **settings).validate(self.config)
        key = affinity_key(context) if self.affinity else None
        handle = self.handle.options(stream=True, **({"multiplexed_model_id": key} if key else {}))
        chunking = dict(first_chunk_frames=first_chunk_frames, chunk_frames=chunk_frames)
        return RemoteStream(lambda: handle.stream.remote(text, list(context), params, chunking))


class RemoteStream:
    """`ChunkStream` over one streaming call to a replica: each item is a chunk and the replica's
    stats so far, which this stream's `stats` take over.  A failed replica becomes EngineStopped,
    a full deployment EngineBusy; closing the stream cancels the call."""

    def __init__(self, call):
        self.stats = GenerationStats()
        self._call, self._agen = call, None

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._agen is None:
            self._agen = self._chunks()
        return await anext(self._agen)

    async def aclose(self) -> None:
        if self._agen is not None:
            await self._agen.aclose()

    async def _chunks(self):
        calls = None
        try:
            calls = self._call()
            async for chunk, remote_stats in calls:
                for name, value in remote_stats.items():
                    setattr(self.stats, name, value)
                yield chunk
        except (GeneratorExit, asyncio.CancelledError):  # closed early (client gone, a turn cancelled)
            if calls is not None:
                with suppress(Exception):  # a request that never reached a replica: nothing to stop
                    calls.cancel()
            raise
        except RayActorError as err:
            raise EngineStopped(f"the replica serving this request failed ({type(err).__name__}); "
                                "retry: another replica serves it") from err
        except BackPressureError as err:
            raise EngineBusy(f"every replica is full and the deployment's queue too: {err.message}") from err
        except DeploymentUnavailableError as err:
            raise EngineStopped(f"no replica is serving: {err.message}") from err


async def serve_stream(tts, text: str, context, params: GenerationParams, chunking: dict, replica: str):
    """Replica side of `RemoteTTS.astream`: (chunk, stats so far) pairs of one generation."""
    stream = tts.astream(text, context=context, params=params, **chunking)
    async with aclosing(stream):
        async for chunk in stream:
            yield chunk, {**stats_dict(stream.stats), "served_by": replica}

