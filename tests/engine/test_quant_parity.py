"""The engine computes a quantised model's codes as the plain model does, bit for bit (CPU,
fp32): both call the same QuantLinear, the engine on its fused qkv and gate_up."""
import pytest
import torch

from misotts.engine import Engine, EngineConfig
from misotts.engine.ops import TorchOps, make_ops
from misotts.runtime.generate import generate_codes
from misotts.weights import quantize
from misotts.weights.quantize import quantize_model

from .conftest import generate, history, make_model, prompt
from .test_parity import SETTINGS, assert_engine_equals_reference


@pytest.mark.parametrize("scheme", quantize.SCHEMES)
def test_quantised_engine_equals_quantised_reference(scheme):
    frames, mask = prompt("And what did you think of it?", 1, history(2))
    model = quantize_model(make_model(std=0.1), scheme)
    assert_engine_equals_reference(model, frames, mask, 8, prefill_chunk=16)


def test_quantised_weights_change_the_codes():
    # The engine really runs the quantised weights: int4 on a model this wide moves greedy codes.
    frames, mask = prompt()
    plain, int4 = make_model(std=0.1), quantize_model(make_model(std=0.1), "int4")
    codes = []
    for model in (plain, int4):
        engine = Engine(model, EngineConfig(max_batch=2))
        codes.append(generate(engine, frames, mask, 4, temperature=0.0, stop_on_eos=False))
        engine.close()
    assert not (codes[0] == codes[1]).all()


def test_quantised_models_get_the_torch_op_set_unless_triton_is_asked_for():
    from misotts.engine.quant_ops import QuantTritonOps

    assert isinstance(make_ops("auto", torch.device("cuda"), quantized=True), TorchOps)
    assert isinstance(make_ops("triton", torch.device("cpu"), quantized=True), QuantTritonOps)


@pytest.mark.slow
def test_quantised_triton_ops_in_the_interpreter_equal_reference(monkeypatch):
    """The quantised GEMVs (int4 backbone, int8 decoder) run by Triton's CPU interpreter in the
    engine give the reference codes.  The reference's int8 linears take the dequantising path
    here: the CPU int8 GEMM rounds activations to bf16, the kernels compute in fp32 as the
    dequantise reference does.  (fp8 is checked kernel by kernel: tests/kernels/test_quant_linear.py.)"""
    from misotts.kernels import reference as ref

    monkeypatch.setattr(quantize.QuantLinear, "forward",
                        lambda self, x: ref.quant_linear_ref(x, self.weight, self.weight_scale, self.scheme))
    frames, mask = prompt("Hi!")
    model = quantize_model(make_model(), "int4")
    engine = Engine(model, EngineConfig(max_batch=1, ops="triton", pipelined=False))
    try:
        want = generate_codes(model, frames, mask, 2, stop_on_eos=False, **SETTINGS[1])
        assert torch.equal(generate(engine, frames, mask, 2, stop_on_eos=False, **SETTINGS[1]), want)
    finally:
        engine.close()


@pytest.mark.slow
def test_compiled_cpu_engine_runs_the_int8_gemm():
    # The int8 GEMM is an opaque op to Inductor (its own lowering fails on a fused input).
    frames, mask = prompt()
    model = quantize_model(make_model(std=0.1), "int8")
    engine = Engine(model, EngineConfig(max_batch=1, compile=True))
    try:
        codes = generate(engine, frames, mask, 3, temperature=0.0, stop_on_eos=False)
    finally:
        engine.close()
    assert torch.equal(codes, generate_codes(model, frames, mask, 3, temperature=0.0, stop_on_eos=False))
