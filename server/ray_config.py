"""What `misotts serve --ray` deploys, how many, and the key it routes a voice by: plain settings
and functions, usable without Ray installed."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from misotts.engine.engine import default_max_batch



@dataclass
class ReplicaConfig:
    """What the deployments load: the arguments of `misotts.load` and `create_app`."""
    model: str = "tiny"
    device: str | None = None  # None: cuda when the replica has a GPU, else cpu
    dtype: str | None = None  # a name in runtime.devices.DTYPES: bf16, fp16, fp32, ...
    random_init: bool = False
    codec: str | None = None
    tokenizer: str | None = None
    engine: dict = field(default_factory=dict)  # EngineConfig fields
    voices_dir: str = "voices"  # read and written by every API replica: on a cluster, a shared folder
    api_key: str | None = None
    model_name: str | None = None
    threads: int | None = None  # torch threads per engine replica (CPU replicas)
    max_turn_tokens: int | None = None
    voice_affinity: bool = True  # route a voice's requests to the replica that served it


@dataclass
class Scaling:
    replicas: int = 1  # engine replicas
    autoscale: tuple[int, int] | None = None  # (min, max) engine replicas, scaled on ongoing requests
    target_ongoing: float | None = None  # per engine replica; default 3/4 of its lanes
    gpus: float = 0.0  # per engine replica: 1 for one engine per GPU
    cpus: float = 1.0  # per engine replica
    api_replicas: int = 1
    api_cpus: float = 0.0  # the API only parses and relays; 0 lets it sit beside engines that hold every CPU
    max_queued: int = 64  # generations waiting in the API for an engine lane before 429s
    upscale_delay_s: float | None = None  # autoscaling: None keeps Ray's (30 s)
    downscale_delay_s: float | None = None  # autoscaling: None keeps Ray's (600 s)


def deployment_options(config: ReplicaConfig, scaling: Scaling) -> tuple[dict, dict]:
    """Ray Serve options of (the engine deployment, the API deployment)."""
    cuda = scaling.gpus > 0 or (config.device or "").startswith("cuda")
    lanes = config.engine.get("max_batch") or default_max_batch(cuda)
    engine = {"max_ongoing_requests": lanes, "max_queued_requests": scaling.max_queued,
              "ray_actor_options": {"num_cpus": scaling.cpus, "num_gpus": scaling.gpus}}
    if scaling.autoscale is None:
        engine["num_replicas"] = scaling.replicas
    else:
        low, high = scaling.autoscale
        engine["autoscaling_config"] = {
            "min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
            "target_ongoing_requests": scaling.target_ongoing or max(1.0, 0.75 * lanes)}
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(scaling, name) is not None:
                engine["autoscaling_config"][name] = getattr(scaling, name)
    # The API only parses and relays: many requests per replica (Ray's own default is 5).
    api = {"num_replicas": scaling.api_replicas, "max_ongoing_requests": 1024,
           "ray_actor_options": {"num_cpus": scaling.api_cpus}}
    return engine, api


def check_scaling(scaling: Scaling) -> None:
    if scaling.autoscale is None:
        if scaling.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, not {scaling.replicas}")
    else:
        low, high = scaling.autoscale
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, not {low}:{high}")
    if scaling.target_ongoing is not None and scaling.target_ongoing <= 0:
        raise ValueError("--target-ongoing must be positive")


def parse_autoscale(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    if not sep or not low.isdigit() or not high.isdigit():
        raise ValueError(f"--autoscale takes MIN:MAX replicas, e.g. 1:4, not {text!r}")
    return int(low), int(high)


def from_args(args: dict) -> tuple[ReplicaConfig, Scaling]:
    """`key=value` arguments (strings from `serve run`, or a config file's values) -> settings."""
    args = dict(args)
    scaling_keys = set(Scaling.__dataclass_fields__)
    unknown = set(args) - scaling_keys - set(ReplicaConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}: use ReplicaConfig or Scaling fields")
    scaling = {k: args.pop(k) for k in list(args) if k in scaling_keys}
    if isinstance(scaling.get("autoscale"), str):
        scaling["autoscale"] = parse_autoscale(scaling["autoscale"])
    for name, kind in (("replicas", int), ("gpus", float), ("cpus", float), ("max_queued", int),
                       ("target_ongoing", float), ("api_replicas", int), ("api_cpus", float),
                       ("upscale_delay_s", float), ("downscale_delay_s", float)):
        if name in scaling:
            scaling[name] = kind(scaling[name])
    for name in ("threads", "max_turn_tokens"):
        if name in args:
            args[name] = int(args[name])
    for name in ("random_init", "voice_affinity"):
        if isinstance(args.get(name), str):
            args[name] = _boolean(name, args[name])
    return ReplicaConfig(**args), Scaling(**scaling)


def _boolean(name: str, text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} takes true or false, not {text!r}")


def affinity_key(context) -> str | None:
    """A key for the prompt's fixed prefix (its first context turn: a voice, or the caller's first
    given turn); None for a prompt with no context (nothing worth routing by: any replica)."""
    if not context:
        return None
    first = context[0]
    digest = hashlib.sha256(f"{first.speaker}\x00{first.text}\x00".encode())
    for tensor in (first.codes, first.audio):
        if tensor is not None:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]
