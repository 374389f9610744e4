"""The command line: arguments checked before any model loads, errors in one line with exit 2,
speech to stdout, text from stdin or a file, contexts that carry any text, info from the config."""
import io
import json
import subprocess
import sys
import wave

import pytest
import torch

import misotts
from misotts import cli
from misotts.cli import main
from misotts.runtime.audio import save_wav
from misotts.runtime.config import PRESETS

FRAME = 1920


@pytest.fixture
def no_loading(monkeypatch):
    """Fails a test that reaches model loading: argument errors must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load", refuse)
    from misotts.runtime.model import CSMModel

    monkeypatch.setattr(CSMModel, "__init__", refuse)  # info must not build one


@pytest.mark.parametrize("argv, message", [
    (["speak", "hi", "--context", "1:Hi:x.wav"], r"--context SPEAKER TEXT \[AUDIO\] takes .*SPEAKER:TEXT form is gone"),
    (["speak", "hi", "--context", "one", "Hi"], r"takes a speaker number"),
    (["speak", "hi", "--context", "1", "Hi", "missing.wav"], r"--context audio missing\.wav: no such file"),
    (["speak", "hi", "--speaker", "-1"], r"--speaker must be >= 0, got -1"),
    (["speak", "hi", "--temperature", "-0.5"], r"--temperature must be >= 0"),
    (["speak", "hi", "--topk", "0"], r"--topk must be >= 1"),
    (["speak", "hi", "--max-audio-ms", "0"], r"--max-audio-ms must be > 0"),
    (["speak", "   "], r"the text to speak is empty"),
    (["speak"], r"give the text to speak"),
    (["speak", "hi", "--model", "csm1b"], r"checkpoint directory not found: csm1b .*Did you mean 'csm-1b'\? .*miso-8b, csm-1b, tiny"),
    (["speak", "hi", "--model", "miso-8b"], r"no public checkpoint is known for 'miso-8b'.*--random-init"),
    (["speak", "hi", "--model", "./ckpt", "--random-init"], r"--random-init builds a preset"),
    (["speak", "hi", "--device", "gpu"], r"unknown device 'gpu' .*available here: cpu"),
    (["speak", "hi", "--tokenizer", "nope.json"], r"--tokenizer nope\.json: no such file"),
    (["speak", "hi", "--codec", "nope.safetensors"], r"--codec nope\.safetensors: no such file"),
    (["speak", "hi", "--text-file", "nope.txt"], r"give the text .*one of them"),
    (["speak", "--text-file", "nope.txt"], r"--text-file nope\.txt: no such file"),
    (["info", "--model", "csm1b"], r"Did you mean 'csm-1b'"),
    (["speak", "hi", "--seed", "-5"], r"--seed must be in 0\.\.2\*\*63-1, got -5"),
    (["speak", "hi", "-o", "nodir/x.wav"], r"-o nodir/x\.wav: the folder nodir does not exist"),
    (["serve", "--port", "70000"], r"--port must be in 1\.\.65535, got 70000"),
    (["serve", "--api-key", ""], r"--api-key: the API key is empty"),
    (["serve", "--api-key", "clé"], r"--api-key: the API key must be printable ASCII"),
    (["serve", "--shutdown-grace", "-1"], r"--shutdown-grace must be >= 0"),
    (["serve", "--max-batch", "0"], r"--max-batch must be >= 1"),
    (["serve", "--prefill-chunk", "0"], r"--prefill-chunk must be >= 1"),
    (["serve", "--kv-memory-fraction", "1.5"], r"--kv-memory-fraction must be in \(0, 1\]"),
    (["convert", "tiny", "out"], r"'tiny' is a preset with random weights only: there is no checkpoint to convert"),
    (["convert", "nothere", "out"], r"nothere: no such checkpoint folder"),
])
def test_bad_arguments_fail_before_loading_with_exit_2(argv, message, no_loading, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"misotts {argv[0]}: error: "), err
    import re
    assert re.search(message, err), err


def test_output_folder_is_refused_before_loading(tmp_path, no_loading, capsys):
    assert main(["speak", "hi", "-o", str(tmp_path)]) == 2
    assert "is a folder: name the WAV file" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_cuda(no_loading, capsys):
    assert main(["speak", "hi", "--device", "cuda"]) == 2
    assert "is not available" in capsys.readouterr().err


def test_speak_to_stdout_with_text_from_stdin_and_colons_in_context(monkeypatch, capsys, tmp_path):
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello: from stdin\n"))
    seen = {}
    real_stream = misotts.TTS.stream

    def spy(self, text, **kwargs):
        seen.update(text=text, context=[(s.speaker, s.text, s.audio) for s in kwargs["context"]])
        return real_stream(self, text, **kwargs)

    monkeypatch.setattr(misotts.TTS, "stream", spy)
    turns = tmp_path / "turns.jsonl"
    save_wav(tmp_path / "a.wav", torch.zeros(FRAME))
    turns.write_text('{"speaker": 0, "text": "First: with a colon"}\n\n{"speaker": 1, "text": "Second", "audio": "a.wav"}\n')
    assert main(["speak", "-", "-o", "-", "--max-audio-ms", "160", "--device", "cpu", "--context-file", str(turns),
                 "--context", "1", "Hi: there, 10:30"]) == 0
    assert seen["text"] == "Hello: from stdin"
    assert seen["context"] == [(0, "First: with a colon", None), (1, "Second", str(tmp_path / "a.wav")),
                               (1, "Hi: there, 10:30", None)]
    stdout.flush()
    with wave.open(io.BytesIO(stdout.buffer.getvalue())) as f:
        assert (f.getframerate(), f.getnchannels(), f.getnframes()) == (24000, 1, 2 * FRAME)
    err = capsys.readouterr().err
    assert "wrote stdout" in err and "real-time factor" in err
    assert "never end a turn, so it runs to --max-audio-ms" in err


def test_text_file(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("From a file.\n")
    out = tmp_path / "t.wav"
    assert main(["speak", "--text-file", str(tmp_path / "t.txt"), "-o", str(out), "--max-audio-ms", "80",
                 "--device", "cpu"]) == 0
    with wave.open(str(out)) as f:
        assert f.getnframes() == FRAME


def test_piped_speak_shows_no_progress_bar(tmp_path):
    run = subprocess.run([sys.executable, "-m", "misotts", "speak", "Hi", "-o", str(tmp_path / "p.wav"),
                          "--max-audio-ms", "160", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "speaking" not in run.stderr and "frame/s" not in run.stderr and "\r" not in run.stderr


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"misotts {misotts.__version__}"
    with pytest.raises(SystemExit):
        main(["speak", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--speaker", "0"), ("--seed", "0"), ("--temperature", "0.9"), ("--topk", "50"),
                          ("--max-audio-ms", "10000")):
        assert f"{flag} " in help_text and f"(default: {default}" in help_text.split(flag, 2)[-1].split("--", 1)[0], flag


def test_info_from_the_config_alone(no_loading, capsys):
    """info describes csm-1b without building it; its parameter count is the config's, and that
    count is the model's (checked on tiny, whose model is cheap to build)."""
    assert main(["info", "--model", "csm-1b", "--random-init", "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == PRESETS["csm-1b"].num_parameters()
    assert info["weight_bytes"] == 4 * info["parameters"] and info["untrained"]
    assert 1.5e9 < info["parameters"] < 1.6e9


def test_config_parameter_count_is_the_models():
    from misotts.weights import random_model

    for name in ("tiny",):
        model = random_model(PRESETS[name])
        assert sum(p.numel() for p in model.parameters()) == PRESETS[name].num_parameters()


def test_moshi_missing_is_one_line(tmp_path):
    code = ("import sys; sys.modules['moshi'] = None; from misotts.cli import main; "
            f"sys.exit(main(['speak', 'hi', '-o', {str(tmp_path / 'x.wav')!r}, '--device', 'cpu']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0, run.stderr
    assert "pip install --no-deps moshi==0.2.13" in run.stderr


def test_serve_finds_a_port_in_use_before_loading(no_loading, capsys, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--device", "cpu", "--voices-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in err, err


def test_missing_extras_are_named_with_the_pip_command(no_loading, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'serve needs uvicorn' in err and 'pip install "misotts[server]"' in err, err

    def needs_transformers(args):
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")

    monkeypatch.setattr(cli, "cmd_info", needs_transformers)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install \"transformers>=5.0\"" in err, err


def test_offline_hub_lookups_fail_at_once_with_the_fix(monkeypatch, no_loading, capsys):
    import huggingface_hub

    from misotts.weights.load import download

    def never(*args, **kwargs):
        raise AssertionError("the hub was asked (and retried) although it cannot be reached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", never)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # nothing cached
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(FileNotFoundError, match=r"cannot be reached.*hf download someone/model --local-dir DIR"):
        download("someone/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE is set"):
        download("someone/model")
    # a preset's shape needs no hub: info works offline
    assert main(["info", "--model", "csm-1b", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == PRESETS["csm-1b"].num_parameters()


def test_load_takes_dtype_names():
    tts = misotts.load("tiny", device="cpu", dtype="fp32", progress=False, backend="reference")
    assert tts.model.text_embeddings.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype 'half8': expected a torch dtype or one of bf16"):
        misotts.load("tiny", device="cpu", dtype="half8")


def test_serve_passes_its_engine_settings_to_the_engine_and_the_ray_replicas():
    from misotts.cli import _engine_settings, build_parser
    from misotts.engine import EngineConfig

    args = build_parser().parse_args(["serve", "--max-batch", "64", "--prefill-chunk", "256",
                                      "--kv-memory-fraction", "0.6"])
    settings = _engine_settings(args)
    assert settings == {"max_batch": 64, "prefill_chunk": 256, "kv_memory_fraction": 0.6}
    EngineConfig(**settings)  # every key is an EngineConfig field
    assert _engine_settings(build_parser().parse_args(["serve"])) == {}  # unset: EngineConfig's defaults
