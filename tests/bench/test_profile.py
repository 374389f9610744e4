"""The frame profiler's plumbing on the CPU: an eager TorchOps frame of the tiny model, profiled by aten op."""
import json

import pytest
import torch

from misotts.bench import profile
from misotts.runtime.config import PRESETS


def gemm_weight_bytes(cfg, dtype_bytes):
    """The matmul weights a frame reads (from the config, not from the tool): every backbone layer's
    once, codebook 0's head and the projection once, the depth decoder's layers in each of its 32
    passes (position 0, then one per codebook 1..31) and one audio head per codebook 1..31."""
    def layer_weights(t):
        return t.n_layers * (t.dim * t.head_dim * (2 * t.n_heads + 2 * t.n_kv_heads) + 3 * t.dim * t.ffn_dim)

    bb, dec, n, v = cfg.backbone, cfg.decoder, cfg.num_codebooks, cfg.audio_vocab_size
    return dtype_bytes * (layer_weights(bb) + v * bb.dim + bb.dim * dec.dim + n * layer_weights(dec)
                          + (n - 1) * dec.dim * v)


def test_cpu_profile_writes_a_table_with_bytes(tmp_path):
    assert profile.main(["--device", "cpu", "--model", "tiny", "--batch", "2", "--frames", "1", "--context", "40",
                         "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "profile-tiny-b2.json").read_text())
    rows = summary["rows"]
    assert summary["model"] == "tiny" and summary["batch"] == 2 and "commit" in summary["code"]
    assert [json.loads(line) for line in (tmp_path / "profile-tiny-b2.jsonl").read_text().splitlines()] == rows
    assert [r["us"] for r in rows] == sorted((r["us"] for r in rows), reverse=True) and rows[0]["us"] > 0
    assert sum(r["pct_of_frame"] for r in rows) == pytest.approx(100)
    gemm = {r["kernel"]: r for r in rows if r["kernel"] in profile.GEMM_OPS}
    assert gemm and sum(r["bytes"] for r in gemm.values()) >= gemm_weight_bytes(PRESETS["tiny"], 4)

    # The GEMMs' calls per frame as the profiler saw them equal what the traffic counter sees (two mechanisms).
    runner = profile.make_runner("tiny", 2, 40, "cpu", torch.float32, "torch")
    with profile.traffic_of(runner) as traffic:
        runner.decode_frame(2)
    assert {name: traffic.calls[name] for name in gemm} == {name: r["calls"] for name, r in gemm.items()}


def test_traffic_counts_the_bytes_an_op_is_given_and_returns():
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    with profile.Traffic(set()) as counter:
        torch.mm(x, w.t())
    assert counter.calls["aten::mm"] == 1 and counter.bytes["aten::mm"] == (3 * 8 + 5 * 8 + 3 * 5) * 4
    with profile.Traffic({w.untyped_storage().data_ptr()}) as counter:  # a gathered table: not counted
        w[torch.tensor([1])]
    assert counter.bytes["aten::index"] == 8 + 8 * 4


def test_profile_with_quantised_weights_runs_after_the_unquantised_frame(tmp_path):
    """--weights int8: the same frame with int8 linears in the same run, its own table, the unquantised
    one first; the quantised frame's GEMMs read a quarter of the fp32 weights' bytes and its table says
    which weights it ran."""
    assert profile.main(["--device", "cpu", "--model", "tiny", "--batch", "2", "--frames", "1", "--context", "40",
                         "--weights", "int8", "--out", str(tmp_path)]) == 0
    plain = json.loads((tmp_path / "profile-tiny-b2.json").read_text())
    int8 = json.loads((tmp_path / "profile-tiny-b2-int8.json").read_text())
    assert plain["weights"] is None and int8["weights"] == "int8"
    assert plain["frame_us"] > 0 and int8["frame_us"] > 0
    runner = profile.make_runner("tiny", 2, 40, "cpu", torch.float32, "torch", weights="int8")
    from misotts.weights.quantize import QuantLinear

    for stack in (runner.bb, runner.dec):
        assert all(isinstance(w, QuantLinear) and w.scheme == "int8" for w in [*stack.qkv, *stack.wo, *stack.gate_up])
