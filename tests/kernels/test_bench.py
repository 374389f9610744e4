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


def test_bench_cases_run_on_cpu():
    """Wiring check without a GPU: every case's Triton and torch callables run (interpreter, tiny shapes)."""
    from misotts.bench.kernels import _cases

    cases = _cases("csm-1b", torch.device("cpu"), dtype=torch.float32, small=True)
    assert {c.kernel for c in cases} == {"rvq_embed", "rope_kv_write", "paged_decode", "paged_prefill", "rmsnorm",
                                         "swiglu", "depth_step", "sample_topk",
                                         "norm_linear", "depth_attention", "sample_next_input"}
    for case in cases:
        case.triton()
        case.torch()
        assert case.bytes > 0
