"""--weights on the command line: checked before any model loads (one line, exit 2), and the
quantised size in `info`."""
import json
import re

import pytest
import torch

from misotts.cli import main
from misotts.runtime.config import PRESETS
from misotts.weights.memory import weight_bytes
from misotts.weights.quantize import QuantConfig

from .test_cli import no_loading  # noqa: F401 (a fixture)


@pytest.mark.parametrize("argv, message", [
    (["speak", "hi", "--weights", "int3"], r"unknown weights 'int3' \(--weights / weights=\): expected one of int8, fp8, int4"),
    (["speak", "hi", "--weights", "fp8", "--device", "cpu"], r"--weights fp8 .* has no CPU kernel here.*use int8"),
    (["speak", "hi", "--weights", "int4", "--device", "cpu"], r"--weights int4 .* has no CPU kernel here"),
    (["serve", "--weights", "int4", "--device", "cpu"], r"--weights int4 .* has no CPU kernel here"),
    (["serve", "--weights", "int8", "--ray"], r"--weights is not passed to Ray Serve replicas yet"),
    (["info", "--weights", "INT8"], r"unknown weights 'INT8'"),
])
def test_bad_weights_fail_before_loading_with_exit_2(argv, message, no_loading, capsys):  # noqa: F811
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"misotts {argv[0]}: error: "), err
    assert re.search(message, err), err


def test_info_counts_the_quantised_size(no_loading, capsys):  # noqa: F811
    csm = PRESETS["csm-1b"]
    assert main(["info", "--model", "csm-1b", "--random-init", "--device", "cpu", "--dtype", "bf16",
                 "--weights", "int4", "--json"]) == 0  # described, not run: any scheme
    info = json.loads(capsys.readouterr().out)
    assert info["weights"] == "int4"
    assert info["weight_bytes"] == weight_bytes(csm, torch.bfloat16, QuantConfig.make("int4", csm))
    assert main(["info", "--model", "csm-1b", "--random-init", "--device", "cpu", "--dtype", "bf16",
                 "--weights", "int8"]) == 0
    assert "(1.88 GiB as bfloat16 with int8 weights)" in capsys.readouterr().out
