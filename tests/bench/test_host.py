"""bench.host: the engine's real loop over a runner that does no device work."""
import torch

from misotts.bench import host
from misotts.engine import Engine, EngineConfig
from misotts.runtime.config import PRESETS
from misotts.runtime.model import CSMModel
from misotts.runtime.params import GenerationParams
from misotts.runtime.audio import FRAME_MS


def test_the_null_runner_drives_the_real_loop_to_every_stream():
    """Meta weights, no device work: the loop still admits, prefills (as nothing), runs frames and
    hands each stream exactly its frames, then frees every block."""
    config = PRESETS["csm-1b"]
    with torch.device("meta"):
        model = CSMModel(config)
    engine = Engine(model, EngineConfig(max_batch=4, pipelined=True), runner=host.NullRunner(config, 4, 16))
    streams = [engine.submit(*host._prompt(config, 20 + i, i), GenerationParams(max_audio_ms=(3 + i) * FRAME_MS,
                                                                                   stop_on_eos=False))
               for i in range(6)]  # more than the lanes: two wait for a lane
    got = [s.codes() for s in streams]
    assert engine.wait_idle() and engine.pool.all_free()
    engine.close()
    assert [c.shape for c in got] == [(3 + i, config.num_codebooks) for i in range(6)]
    assert all(bool((c == 1).all()) for c in got)  # the null frame's codes, nothing else


def test_measure_times_the_frames_it_asked_for():
    row = host.measure("tiny", 3, 20, prompt_rows=8)
    assert row["frames"] >= 20 and row["batch"] == 3
    assert 0 < row["postprocess_us_per_frame"] < row["host_us_per_frame"]
    assert 0 < row["hand_out_us_per_frame"] < row["host_us_per_frame"]


def test_cli_prints_a_row_per_batch(capsys, tmp_path):
    assert host.main(["--model", "tiny", "--batch", "1,2", "--frames", "10", "--prompt-rows", "4",
                      "--out", str(tmp_path / "host.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [["tiny", "1"], ["tiny", "2"]]
    assert (tmp_path / "host.json").exists()
