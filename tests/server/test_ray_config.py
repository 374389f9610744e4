"""Ray Serve settings, the affinity key and `serve --ray`'s argument checks: no Ray cluster needed
(and, but for two tests, no Ray installed: the GPU machine's suite runs these without it)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from misotts.runtime.prompt import Segment
from misotts.server.ray_config import (ReplicaConfig, Scaling, affinity_key, check_scaling, deployment_options,
                                       from_args)


def test_engine_replicas_take_requests_up_to_their_lanes_and_autoscale_on_them():
    engine, api = deployment_options(ReplicaConfig(engine={"max_batch": 12}), Scaling(replicas=3))
    assert engine["max_ongoing_requests"] == 12 and engine["num_replicas"] == 3
    assert engine["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    engine, _ = deployment_options(ReplicaConfig(device="cuda"), Scaling(autoscale=(0, 8), gpus=1))
    assert engine["max_ongoing_requests"] == 32  # the engine's default lanes on CUDA
    assert engine["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 8, "initial_replicas": 1,
                                            "target_ongoing_requests": 24.0}
    assert "num_replicas" not in engine and engine["ray_actor_options"]["num_gpus"] == 1
    engine, _ = deployment_options(ReplicaConfig(), Scaling(autoscale=(2, 4), target_ongoing=5, upscale_delay_s=3))
    assert engine["max_ongoing_requests"] == 8 and engine["autoscaling_config"]["target_ongoing_requests"] == 5
    assert engine["autoscaling_config"]["upscale_delay_s"] == 3 and "downscale_delay_s" not in engine["autoscaling_config"]
    assert api["ray_actor_options"]["num_cpus"] == 0.0 and api["max_ongoing_requests"] > 8


@pytest.mark.parametrize("scaling, message", [
    (Scaling(replicas=0), "at least 1"), (Scaling(autoscale=(3, 2)), "MIN <= MAX"),
    (Scaling(autoscale=(0, 0)), "MAX >= 1"), (Scaling(target_ongoing=0), "positive")])
def test_impossible_scaling_is_refused(scaling, message):
    with pytest.raises(ValueError, match=message):
        check_scaling(scaling)


def test_serve_run_arguments_become_typed_settings():
    config, scaling = from_args({"model": "csm-1b", "replicas": "2", "gpus": "1", "autoscale": "1:4",
                                 "threads": "3", "random_init": "true", "voice_affinity": "off",
                                 "engine": {"max_batch": 16}})
    assert (config.model, config.threads, config.random_init, config.voice_affinity, config.engine) == \
        ("csm-1b", 3, True, False, {"max_batch": 16})
    assert (scaling.replicas, scaling.gpus, scaling.autoscale) == (2, 1.0, (1, 4))
    with pytest.raises(ValueError, match="unknown arguments \\['replica'\\]"):
        from_args({"replica": "2"})
    with pytest.raises(ValueError, match="MIN:MAX"):
        from_args({"autoscale": "4"})
    with pytest.raises(ValueError, match="true or false"):
        from_args({"random_init": "maybe"})


def test_the_affinity_key_follows_the_prompts_fixed_prefix():
    codes = torch.arange(40).reshape(5, 8)
    voice = Segment(2, "Hello, I am Anna.", codes=codes)
    key = affinity_key([voice, Segment(2, "an earlier turn", codes=codes[:2])])
    assert key == affinity_key([Segment(2, "Hello, I am Anna.", codes=codes.clone())])  # the later turns don't matter
    assert key != affinity_key([Segment(2, "Hello, I am Anna.", codes=codes + 1)])  # re-recorded: a new prefix
    assert key != affinity_key([Segment(3, "Hello, I am Anna.", codes=codes)])
    assert key != affinity_key([Segment(2, "Hello, I am Ann.", codes=codes)])
    assert affinity_key([]) is None  # no context: any replica


@pytest.mark.parametrize("args, message", [
    (["--replicas", "2"], "--replicas: for Ray Serve only; add --ray"),
    (["--ray", "--replicas", "2", "--autoscale", "1:2"], "not both"),
    (["--ray", "--autoscale", "2"], "MIN:MAX"),
    (["--ray", "--replicas", "0"], "at least 1")])
def test_serve_checks_its_ray_arguments_before_loading_anything(args, message):
    result = subprocess.run([sys.executable, "-m", "misotts", "serve", "--model", "no-such-model", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_the_documented_serve_config_builds_settings():
    yaml = pytest.importorskip("yaml")  # Ray's own dependency
    doc = yaml.safe_load((Path(__file__).parents[2] / "docs" / "ray-serve.yaml").read_text())
    (app,) = doc["applications"]
    assert app["import_path"] == "misotts.server.ray_serve:build_app"
    config, scaling = from_args(app["args"])
    check_scaling(scaling)
    assert (config.model, config.dtype, config.engine, scaling.gpus, scaling.autoscale, scaling.api_replicas) == \
        ("csm-1b", "bf16", {"max_batch": 32}, 1, (1, 8), 2)
    engine, _ = deployment_options(config, scaling)
    assert engine["max_ongoing_requests"] == 32 and engine["autoscaling_config"]["target_ongoing_requests"] == 24


def test_an_engine_that_stopped_fails_its_replicas_health_check():
    # Ray calls check_health every few seconds and replaces a replica that fails it.
    import misotts

    pytest.importorskip("ray")  # the [ray] extra; the test extra installs it
    from misotts.server.ray_serve import SpeechEngine

    replica = object.__new__(SpeechEngine.func_or_class)  # the class as written, without a Ray actor
    replica.tts = misotts.load("tiny", device="cpu", progress=False, engine={"max_batch": 1})
    try:
        replica.check_health()
        replica.tts.engine.close()  # as after a device fault that stops the engine
        with pytest.raises(RuntimeError, match="engine closed"):
            replica.check_health()
    finally:
        replica.tts.close()


def test_the_single_process_server_does_not_import_ray():
    code = ("import sys, misotts.cli, misotts.server, misotts.server.ray_config; "
            "from misotts.server import create_app; print('ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
