"""The public API and the CLI on the `tiny` preset (untrained weights, untrained Mimi)."""
import json
import subprocess
import sys
import wave

import pytest
import torch
from safetensors.torch import save_file

import misotts
from misotts.cli import main
from misotts.runtime.generate import generate_codes
from misotts.runtime.prompt import build_prompt, mimi_codes
from misotts.runtime.tokenizer import Llama3Tokenizer

from .tokenizer_files import write_templated_tokenizer

FRAME = 1920


@pytest.fixture(scope="module")
def tts():
    return misotts.load("tiny", device="cpu")


def read_wav(path):
    with wave.open(str(path)) as w:
        return w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()


def test_generate_matches_the_reference_loop_and_decodes_every_frame(tts):
    audio = tts.generate("Hello there.", speaker=0, max_audio_ms=240, temperature=0.9, topk=50, seed=3)
    frames, mask = tts.prompt("Hello there.", speaker=0)
    codes = generate_codes(tts.model, frames, mask, 3, temperature=0.9, topk=50, seed=3)
    assert torch.equal(audio.codes, codes)
    assert audio.sample_rate == 24_000 and audio.samples.dtype == torch.float32
    assert audio.samples.shape == (codes.shape[0] * FRAME,)
    torch.testing.assert_close(audio.samples, tts.codec.decode(mimi_codes(codes)).float(), rtol=0, atol=1e-5)


def test_stream_concatenates_to_generate(tts):
    chunks = list(tts.stream("Stream me.", max_audio_ms=320, seed=5, chunk_frames=3))
    whole = tts.generate("Stream me.", max_audio_ms=320, seed=5)
    assert [c.codes.shape[0] for c in chunks] == [1, 3]  # the first chunk after one frame, then 3
    assert torch.equal(torch.cat([c.codes for c in chunks]), whole.codes)
    torch.testing.assert_close(torch.cat([c.samples for c in chunks]), whole.samples, rtol=0, atol=0)
    stats = whole.stats  # generate's own
    assert stats.frames == 4 and 0 < stats.first_audio_s <= stats.total_s
    prompt_len = len(tts.prompt("Stream me.")[0])
    assert stats.prompt_positions == prompt_len == stats.reused_positions + stats.computed_positions


def test_seed_and_context_change_the_codes(tts):
    a = tts.generate_codes("Same text.", max_audio_ms=160, seed=1)
    assert torch.equal(a, tts.generate_codes("Same text.", max_audio_ms=160, seed=1))
    assert not torch.equal(a, tts.generate_codes("Same text.", max_audio_ms=160, seed=2))
    wav = torch.sin(torch.arange(4800) / 10.0) * 0.3
    ctx = [misotts.Segment(1, "Earlier.", wav)]
    with_ctx = tts.generate_codes("Same text.", context=ctx, max_audio_ms=160, seed=1)
    assert not torch.equal(a, with_ctx)
    # Audio context equals giving its codes directly.
    codes = tts.codec.encode(wav)
    assert codes.shape == (3, 32)
    same = tts.generate_codes("Same text.", context=[misotts.Segment(1, "Earlier.", codes=codes)],
                              max_audio_ms=160, seed=1)
    assert torch.equal(with_ctx, same)


def test_save_writes_a_24khz_mono_wav(tts, tmp_path):
    audio = tts.generate("Save me.", max_audio_ms=160, seed=0)
    path = audio.save(tmp_path / "sub" / "x.wav")
    assert read_wav(path) == (24_000, 1, 2, 2 * FRAME)


@pytest.mark.parametrize("kwargs, match", [
    (dict(text=""), "non-empty"),
    (dict(text="hi", max_audio_ms=0), "max_audio_ms"),
    (dict(text="hi", topk=0), "topk"),
    (dict(text="hi", temperature=-1.0), "temperature"),
    (dict(text="hi", max_audio_ms=200_000), "context window"),
])
def test_bad_requests_are_refused(tts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tts.generate(**kwargs)


def test_multichannel_context_audio_is_refused(tts):
    with pytest.raises(ValueError, match="mono"):
        tts.generate("hi", context=[misotts.Segment(1, "x", torch.zeros(2, 4800))], max_audio_ms=80)


def test_load_errors_are_clear():
    with pytest.raises(ValueError, match="random_init=True"):
        misotts.load("miso-8b", device="cpu")


def test_cli_speak_writes_wav_and_reports_timings(tmp_path, capsys):
    out = tmp_path / "hello.wav"
    assert main(["speak", "Hello", "-o", str(out), "--max-audio-ms", "240", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "untrained" in captured.err
    assert "time to first audio" in captured.out and "real-time factor" in captured.out
    assert read_wav(out) == (24_000, 1, 2, 3 * FRAME)


def test_cli_info_and_errors(capsys):
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"{misotts.load('tiny', device='cpu').info()['parameters'] / 1e6:,.1f} M" in out
    assert main(["info", "--model", "/nonexistent/checkpoint", "--device", "cpu"]) == 2
    assert "error:" in capsys.readouterr().err


def test_console_script_is_installed(tmp_path):
    out = tmp_path / "cli.wav"
    run = subprocess.run([sys.executable, "-m", "misotts", "speak", "Hi", "-o", str(out), "--max-audio-ms", "160",
                          "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert read_wav(out) == (24_000, 1, 2, 2 * FRAME)


def test_special_ids_are_decoded_as_code_zero():
    assert mimi_codes(torch.tensor([[0, 2047, 2048, 2050]])).tolist() == [[0, 2047, 0, 0]]


def test_cli_convert_round_trip_and_refuses_a_non_empty_destination(tmp_path, capsys):
    from misotts.weights import load_model

    src = tmp_path / "src"
    assert main(["convert", "tiny-does-not-exist", str(src)]) == 2
    tts = misotts.load("tiny", device="cpu")
    src.mkdir()
    save_file({k: v.contiguous() for k, v in tts.model.state_dict().items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(tts.config.to_dict()))
    dst = tmp_path / "dst"
    assert main(["convert", str(src), str(dst), "--shard-size", "5MB"]) == 0
    assert len(list(dst.glob("model-*.safetensors"))) >= 2
    model, config, _ = load_model(dst, progress=False)
    assert config == tts.config
    for name, tensor in tts.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert main(["convert", str(src), str(dst)]) == 2
    assert "error:" in capsys.readouterr().err


def test_stop_on_eos_false_runs_to_max_audio_ms():
    tts = misotts.load("tiny", device="cpu")
    tts.model.codebook0_head.weight.zero_()  # greedy then picks code 0 everywhere: an EOS frame
    tts.model.audio_head.zero_()
    assert tts.generate_codes("x", max_audio_ms=240, temperature=0).shape == (0, 32)
    assert tts.generate_codes("x", max_audio_ms=240, temperature=0, stop_on_eos=False).shape == (3, 32)


def test_conversation_reports_reuse_after_audio_turns(tts):
    chat = tts.conversation()
    chat.add(speaker=1, text="Hi.", codes=torch.randint(0, 2048, (3, 32)))
    chat.say("One.", speaker=0, max_audio_ms=160, seed=1)
    first = chat.last_stats
    assert first.reused_positions == 0 and first.computed_positions > 0
    chat.say("Two.", speaker=1, max_audio_ms=160, seed=2)
    # The second turn's prompt starts with the first turn's prompt and its 2 frames.  Turn one
    # wrote KV for its prompt and its first frame (the last frame is never fed back): the full
    # 16-position blocks of that are reused, the rest is computed.
    written = len(tts.prompt("One.", 0, chat.history[:1])[0]) + 2 - 1
    prompt_len = len(tts.prompt("Two.", 1, chat.history[:-1])[0])
    assert chat.last_stats.reused_positions == 16 * (written // 16) > 0
    assert chat.last_stats.reused_positions + chat.last_stats.computed_positions == prompt_len


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_conversation_keeps_only_turns_that_completed(backend, tmp_path):
    tts = misotts.load("tiny", device="cpu", backend=backend, engine={"max_batch": 2})
    chat = tts.conversation()
    chat.add(1, "Hello, who is there?", codes=torch.randint(0, 2048, (3, 32)))
    for speak in (chat.say, chat.say_codes, lambda text, **kw: list(chat.stream(text, **kw))):
        with pytest.raises(ValueError, match="topk"):
            speak("A turn that fails.", topk=0)
    assert len(chat.history) == 1  # a turn that raised joins nothing
    with pytest.raises(FileNotFoundError, match="missing.wav"):  # at add(), not at the next turn
        chat.add(0, "Heard, not made.", audio=str(tmp_path / "missing.wav"))
    with pytest.raises(ValueError, match="0..2047"):
        chat.add(0, "Heard, not made.", codes=torch.full((2, 32), 4096))
    assert len(chat.history) == 1
    # The next turn is what it would be had the failures never happened.
    codes = chat.say_codes("Next.", speaker=0, max_audio_ms=240, seed=3)
    frames, mask = tts.prompt("Next.", 0, chat.history[:1])
    assert torch.equal(codes, generate_codes(tts.model, frames, mask, 3, seed=3))
    # A turn the caller stops early joins with the frames made.
    turn = chat.stream("Cut short.", speaker=1, max_audio_ms=400, seed=4)
    first = next(turn)
    turn.close()
    assert len(chat.history) == 3 and torch.equal(chat.history[-1].codes, mimi_codes(first.codes))
    tts.close()


def test_the_tokenizer_json_bos_eos_reach_the_prompt(tmp_path):
    path = write_templated_tokenizer(tmp_path / "tokenizer.json", bos=5, eos=6)  # tiny's config: 256, 257
    tts = misotts.load("tiny", device="cpu", backend="reference", tokenizer=path)
    frames, mask = tts.prompt("hello world")  # "[0]hello world": words 1 and 2
    assert frames[:, -1].tolist() == [5, 1, 2, 6] and mask[:, -1].all()


def test_reference_refuses_text_ids_outside_the_vocabulary(tmp_path):
    path = write_templated_tokenizer(tmp_path / "tokenizer.json", bos=300, eos=301)
    with pytest.raises(ValueError, match=r"bos_id 300 is outside the model's text vocabulary of 258"):
        misotts.load("tiny", device="cpu", backend="reference", tokenizer=path)  # refused at load now
    tts = misotts.load("tiny", device="cpu", backend="reference")
    tts.tokenizer = Llama3Tokenizer(path)  # the mismatched tokenizer put in by hand: the loop still refuses
    with pytest.raises(ValueError, match="text id 300 .* 258"):
        tts.generate_codes("hello world", max_audio_ms=160)
    frames, mask = build_prompt("hello world", 0, [], tts.tokenizer)  # rows given to the loop directly
    with pytest.raises(ValueError, match="text id 300 .* 258"):
        generate_codes(tts.model, frames, mask, 2)


def test_reference_backend_is_a_one_lane_torch_engine_and_queues_a_second_stream():
    tts = misotts.load("tiny", device="cpu", backend="reference")
    engine = tts.engine
    assert (engine.max_batch, engine.runner.ops.name, engine.graphs.graphs) == (1, "torch", {})
    first = tts.submit("One.", max_audio_ms=800, seed=1)
    reading = iter(first)
    next(reading)
    second = tts.submit("Two.", max_audio_ms=160, seed=2)  # one lane: it waits for the first
    first.cancel()
    frames, mask = tts.prompt("Two.")
    assert torch.equal(second.codes(), generate_codes(tts.model, frames, mask, 2, seed=2))
    assert first.stats.finish in ("cancelled", "max_frames") and first.stats.frames >= 1
    assert tts.engine.wait_idle() and tts.engine.pool.all_free()  # the lane and its blocks are free again
    tts.close()


def test_reference_astream_leaves_the_event_loop_running(monkeypatch):
    """Frames are made in the engine's thread: a heartbeat keeps ticking while each frame is made."""
    import asyncio
    import time

    tts = misotts.load("tiny", device="cpu", backend="reference")
    run = tts.engine.graphs.run

    def slow_frame(n, *args, **kwargs):
        time.sleep(0.3)  # a frame that takes 0.3 s
        return run(n, *args, **kwargs)

    monkeypatch.setattr(tts.engine.graphs, "run", slow_frame)

    async def main():
        ticks = 0

        async def heartbeat():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        beat = asyncio.ensure_future(heartbeat())
        chunks = [c async for c in tts.astream("Hi.", max_audio_ms=240, seed=2)]
        beat.cancel()
        return chunks, ticks

    chunks, ticks = asyncio.run(main())
    assert len(chunks) == 3
    # ~90 ticks in the 0.9 s of frames when the loop runs (>= 10 even at 90 ms a tick on a loaded
    # machine); about one per frame, 3 or 4 in all, if the frames blocked it.
    assert ticks >= 10


def test_negative_speaker_and_too_long_text_are_refused_plainly(tts):
    for speaker, error, message in ((-1, ValueError, r"speaker must be in 0\.\.65535, got -1"),
                                    (1.5, TypeError, r"speaker must be an integer id"),
                                    (True, TypeError, r"speaker must be an integer id")):
        with pytest.raises(error, match=message):
            tts.generate("hi", speaker=speaker, max_audio_ms=80)
        with pytest.raises(error, match=message):
            tts.generate("hi", context=[misotts.Segment(speaker, "earlier")], max_audio_ms=80)
    # No context: the message must not send the user to shorten one.
    with pytest.raises(ValueError, match=r"the prompt \(\d+ positions: the text\) fills the model's context window "
                                         r"of 2048 positions: shorten the text$"):
        tts.generate("x" * 3000, max_audio_ms=80)
    with pytest.raises(ValueError, match=r"lower max_audio_ms, or shorten the prompt \(at most \d+ ms fit"):
        tts.generate("x" * 1900, max_audio_ms=20_000)


def test_typo_in_a_model_name_suggests_the_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"csm1b .*Did you mean 'csm-1b'\? A model is a preset \(miso-8b, csm-1b, tiny\)"):
        misotts.load("csm1b", device="cpu")
