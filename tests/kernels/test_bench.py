"""The GPU benchmark refuses to run on the CPU (the interpreter is no timing)."""
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark would really run")
def test_bench_refuses_without_gpu():
    result = subprocess.run([sys.executable, "-m", "misotts.bench.kernels"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "needs a CUDA GPU" in result.stderr


def test_dry_run_writes_a_row_per_spec_case(tmp_path):
    """Wiring check without a GPU: every spec case's launcher and reference run (interpreter, the tiny
    preset), and each row reaches the results files as it is made, with the commit measured."""
    import json

    from misotts.bench import kernels
    from misotts.kernels import specs
    from misotts.runtime.config import PRESETS

    argv = ["--dry-run", "--preset", "tiny", "--batch", "2", "3", "--no-mimi", "--out", str(tmp_path)]
    assert kernels.main(argv) == 0
    want = [(b, c.kernel, c.shape) for _, b, c in specs.cases(PRESETS["tiny"], (2, 3), context=40, chunk=16)]
    lines = [json.loads(line) for line in (tmp_path / "kernels.jsonl").read_text().splitlines()]
    assert [(r["batch"], r["kernel"], r["shape"]) for r in lines] == want
    assert {r["kernel"] for r in lines} == set(specs.SPECS)
    assert all(r["bytes"] > 0 and r["triton_us"] is None for r in lines)  # a dry run times nothing
    summary = json.loads((tmp_path / "kernels.json").read_text())
    assert summary["rows"] == lines and "commit" in summary["code"]
    table = (tmp_path / "kernels.md").read_text().splitlines()
    assert sum(line.startswith("| tiny |") for line in table) == len(want)
    assert not (tmp_path / "mimi.jsonl").exists()  # --no-mimi


def test_dry_run_mimi_rows_time_each_mimi_bucket_eagerly(tmp_path):
    """`--kernel mimi_decode`: the Mimi rows only, one per Mimi bucket up to the largest batch (3:
    buckets 1, 2, 3), each a CPU timing of that many lanes with its per-lane share and the decoder
    weights' bytes; no kernel rows."""
    import json

    from misotts.bench import kernels
    from misotts.bench.floors import mimi_decode_bytes
    from misotts.runtime.codec import load_codec

    assert kernels.main(["--dry-run", "--kernel", "mimi_decode", "--batch", "3", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "kernels.jsonl").exists()
    rows = [json.loads(line) for line in (tmp_path / "mimi.jsonl").read_text().splitlines()]
    assert [r["bucket"] for r in rows] == [1, 2, 3]
    assert all(r["ms"] > 0 and r["ms_per_lane"] == r["ms"] / r["bucket"] and r["floor_ms"] is None for r in rows)
    assert {r["bytes"] for r in rows} == {mimi_decode_bytes(load_codec(None))}
    summary = json.loads((tmp_path / "mimi.json").read_text())
    assert summary["rows"] == rows and summary["buckets"] == "[1, 2, 3]" and "commit" in summary["code"]
    assert summary["device"].startswith("cpu")
    # a spec name alone: no Mimi rows
    assert kernels.main(["--dry-run", "--kernel", "rmsnorm", "--out", str(tmp_path / "spec")]) == 0
    assert not (tmp_path / "spec" / "mimi.jsonl").exists()
