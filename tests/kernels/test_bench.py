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

    assert kernels.main(["--dry-run", "--preset", "tiny", "--batch", "2", "3", "--out", str(tmp_path)]) == 0
    want = [(b, c.kernel, c.shape) for _, b, c in specs.cases(PRESETS["tiny"], (2, 3), context=40, chunk=16)]
    lines = [json.loads(line) for line in (tmp_path / "kernels.jsonl").read_text().splitlines()]
    assert [(r["batch"], r["kernel"], r["shape"]) for r in lines] == want
    assert {r["kernel"] for r in lines} == set(specs.SPECS)
    assert all(r["bytes"] > 0 and r["triton_us"] is None for r in lines)  # a dry run times nothing
    summary = json.loads((tmp_path / "kernels.json").read_text())
    assert summary["rows"] == lines and "commit" in summary["code"]
    table = (tmp_path / "kernels.md").read_text().splitlines()
    assert sum(line.startswith("| tiny |") for line in table) == len(want)
