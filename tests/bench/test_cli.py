"""The benchmark's command line, end to end on `tiny` with a few frames (no timings asserted)."""
import argparse
import json

import pytest

from misotts.bench.cli import add_parser


def test_bench_subcommand_smoke(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="misotts")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "--models", "tiny", "--systems", "reference,transformers", "--device", "cpu",
                              "--frames", "2", "--repeats", "1", "--streams", "1,2", "--batch-frames", "1",
                              "--workloads", "short",
                              "--out", str(tmp_path)])
    assert args.func(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    tiny = results["models"]["tiny"]
    assert not tiny["errors"]
    for system in ("reference", "transformers"):
        r = tiny["systems"][system]
        assert r["short"]["frames"] == 2 and r["short"]["ttfa_ms"] > 0 and "context" not in r
        assert set(r["throughput"]) == {"1", "2"}
    assert "| reference |" in (tmp_path / "results.md").read_text()
    assert "| reference |" in capsys.readouterr().out


@pytest.mark.parametrize("flag, compile", [([], None), (["--no-compile"], False)])
def test_no_compile_reaches_the_engine(tmp_path, monkeypatch, flag, compile):
    """--no-compile (the GPU suite's CPU rehearsal) builds the engine without its Inductor-compiled
    depth step; without it the engine picks its default (compiled on the CPU)."""
    import misotts.bench.run as run

    runs, built = [], []
    monkeypatch.setattr(run, "run_model", lambda *args: runs.append(args[-1]) or {"errors": {}})
    assert run.main(["--models", "tiny", "--systems", "engine", "--device", "cpu", "--out", str(tmp_path),
                     "--no-report", *flag]) == 0
    assert runs == [compile]
    monkeypatch.setattr(run, "EngineSystem", lambda tts, batch, positions, compile=None: built.append(compile))
    run.make_system("engine", None, run.Plan(), 64, runs[0])
    assert built == [compile]
