"""The benchmark's command line, end to end on `tiny` with a few frames (no timings asserted)."""
import argparse
import json

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
