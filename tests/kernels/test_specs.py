"""Every kernel spec's cases (kernels/specs.py): the launcher against its reference, in fp32 under the
interpreter at odd shapes, and on CUDA at the presets' shapes in fp32/bf16/fp16 with the specs'
tolerance table.  The report and the bench read the same cases."""
import pytest
import torch

from misotts.kernels import specs
from misotts.runtime.config import PRESETS, ModelConfig, TransformerConfig

# Odd sizes everywhere the kernels allow them (the paged kernels need a power-of-two head_dim >= 16):
# widths not a multiple of any tile, 3 kv-head groups, 5 codebooks of 37 codes.
ODD = ModelConfig(
    backbone=TransformerConfig(dim=48, n_layers=1, n_heads=3, n_kv_heads=1, head_dim=16, ffn_dim=40, max_seq_len=320),
    decoder=TransformerConfig(dim=40, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=6, ffn_dim=24, max_seq_len=5),
    text_vocab_size=50, audio_vocab_size=37, num_codebooks=5, bos_id=0, eos_id=1, tokenizer="bytes", name="odd")
# context 300 > 256: the decode splits over two partitions, then merges; 7-row prefill chunks.
ODD_CASES = specs.cases(ODD, batches=(3,), context=300, chunk=7)


def run_case(spec, case, device, dtype):
    inputs = case.make(specs.Tensors(device, dtype, seed=0))
    want = case.reference(specs.float_copy(inputs))
    got = case.run(inputs)
    specs.check(spec, got, want, dtype)
    return got, want


def test_every_kernel_has_a_spec_with_cases():
    assert set(specs.SPECS) == {"rvq_embed", "rope_kv_write", "paged_decode", "paged_prefill", "rmsnorm", "swiglu",
                                "norm_linear", "linear_add", "depth_attention", "sample_next_input", "depth_step",
                                "sample_topk"}
    assert {spec.name for spec, _, _ in ODD_CASES} == set(specs.SPECS)
    for spec in specs.SPECS.values():
        assert set(specs.TOLERANCES[spec.tolerance]) == {torch.float32, torch.bfloat16, torch.float16}


@pytest.mark.parametrize("spec,batch,case", ODD_CASES, ids=[f"{c.kernel}-{c.shape}" for _, _, c in ODD_CASES])
def test_case_in_the_interpreter(spec, batch, case):
    got, want = run_case(spec, case, "cpu", torch.float32)
    assert got.keys() == want.keys() and all(torch.isfinite(v.float()).all() for v in got.values())
    assert case.bytes(case.make(specs.Tensors("meta", torch.float32))) > 0


def test_baselines_compute_what_the_reference_does():
    """A bench baseline (e.g. cuBLAS addmm_ for linear_add) is timed in the reference's place: same result."""
    with_baseline = [(spec, case) for spec, _, case in ODD_CASES if case.baseline]
    assert with_baseline
    for spec, case in with_baseline:
        inputs = case.make(specs.Tensors("cpu", torch.float32))
        want = case.reference(specs.float_copy(inputs))
        got = case.baseline(inputs)
        specs.check(spec, dict(zip(want, [got])), want, torch.float32)


def test_check_fails_on_a_wrong_output():
    spec = specs.SPECS["norm_linear"]
    want = dict(out=torch.ones(3, 4))
    with pytest.raises(AssertionError):
        specs.check(spec, dict(out=torch.ones(3, 4) + 1e-3), want, torch.float32)
    tokens = dict(tokens=torch.tensor([1, 2, 3]), next_input=torch.zeros(3, 2))
    with pytest.raises(AssertionError):  # two lanes differ: more than a near-tie
        specs.check(spec, dict(tokens=torch.tensor([1, 0, 0]), next_input=torch.zeros(3, 2)), tokens, torch.float32)


CUDA_CASES = [(p, s, b, c) for p in ("csm-1b", "miso-8b") for s, b, c in specs.cases(PRESETS[p], batches=(1, 8))]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("preset,spec,batch,case", CUDA_CASES,
                         ids=[f"{p}-{c.kernel}-{c.shape}" for p, _, _, c in CUDA_CASES])
def test_case_on_cuda(preset, spec, batch, case, dtype):
    run_case(spec, case, "cuda", dtype)
