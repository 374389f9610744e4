"""The ahead-of-time report compiles a real kernel for Hopper (no GPU) and prints its resources."""
import os
import subprocess
import sys


def test_report_compiles_rmsnorm_for_sm90a():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    result = subprocess.run(
        [sys.executable, "-m", "misotts.kernels.report", "--arch", "sm_90a", "--kernel", "rmsnorm",
         "--preset", "csm-1b", "--jobs", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| rmsnorm")]
    assert len(rows) == 2  # backbone and decoder widths
    for kernel, launch, shape, arch, registers, spills, shared, ok in (map(str.strip, r) for r in rows):
        assert arch == "sm_90a" and int(registers) > 0 and spills == "0" and ok == "yes"
