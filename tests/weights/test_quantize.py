"""Weight-only quantisation: the stored forms, their reference math, the CPU int8 GEMM, and
models quantised as they are drawn, loaded or converted."""
import json
import shutil

import pytest
import torch

from misotts.kernels import reference as ref
from misotts.runtime.config import PRESETS
from misotts.weights import convert, load_model, random_model
from misotts.weights import quantize as quant
from misotts.weights.memory import weight_bytes
from misotts.weights.quantize import QuantConfig, QuantLinear, quantize_model, quantize_tensor

TINY = PRESETS["tiny"]


def test_int4_packing_by_hand():
    # codes -8, 7, 0, -1 are stored as 0, 15, 8, 7: two a byte, the even column in the low nibble.
    data = torch.tensor([[0xF0, 0x78]], dtype=torch.uint8)
    assert ref.unpack_int4_ref(data).tolist() == [[-8, 7, 0, -1]]
    scale = torch.tensor([[0.5, 2.0]])  # group size 2: columns 0-1, then 2-3
    assert ref.dequantize_ref(data, scale, "int4", torch.float32).tolist() == [[-4.0, 3.5, 0.0, -2.0]]
    w = torch.tensor([[-4.0, 3.5, 0.0, -2.0]])
    codes, s = quantize_tensor(w, "int4", 2)
    # Symmetric: each group's largest |w| is code 7 (4 / 7, 2 / 7); so -4 -> -7, 3.5 -> 6 (6.125 rounds), -2 -> -7.
    assert torch.allclose(s, torch.tensor([[4 / 7, 2 / 7]]))
    assert ref.unpack_int4_ref(codes).tolist() == [[-7, 6, 0, -7]]


@pytest.mark.parametrize("scheme, group", [("int8", 0), ("fp8", 0), ("int4", 4), ("int4", 32)])
@pytest.mark.parametrize("shape", [(5, 96), (33, 64), (3, 160)])
def test_round_trip_error_is_within_one_step(scheme, group, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3  # rows of different ranges
    w[1] = 0  # an all-zero row dequantises to zeros, not NaN
    data, scale = quantize_tensor(w.bfloat16(), scheme, group)
    assert data.dtype == quant.STORAGE[scheme] and scale.dtype == torch.float32
    back = ref.dequantize_ref(data, scale, scheme, torch.float32)
    w = w.bfloat16().float()
    assert torch.equal(back[1], torch.zeros(shape[1]))
    if scheme == "fp8":
        # e4m3 has 3 mantissa bits: rounding errs by at most 2^-4 of the value (normal range),
        # plus the smallest subnormal step 2^-9 times the scale near zero.
        bound = w.abs() * 2**-4 + 2**-9 * scale[:, None]
    else:
        per_column = scale if scheme == "int8" else scale.repeat_interleave(group, 1)
        bound = per_column.reshape(shape[0], -1).expand(shape) / 2 * (1 + 1e-6)  # half a step
        codes = data.float() if scheme == "int8" else ref.unpack_int4_ref(data).float()
        assert codes.abs().max() <= quant.QMAX[scheme]
    assert ((back - w).abs() <= bound).all()
    # Each row's (group's) largest |w| is exactly representable: its code is the extreme one.
    peak = w.abs().argmax(1)
    rows = torch.arange(shape[0])
    assert torch.allclose(back[rows, peak], w[rows, peak], rtol=1e-6, atol=0)


@pytest.mark.parametrize("k", [16, 48, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_int8_gemm_matches_the_reference(k, dtype):
    torch.manual_seed(1)
    m = 37
    data, scale = quantize_tensor(torch.randn(m, k) * 0.05, "int8")
    layer = QuantLinear(k, m, "int8")
    layer.weight, layer.weight_scale = data, scale
    x = torch.randn(2, 5, k).to(dtype)
    got = layer(x)
    want = ref.quant_linear_ref(x.float(), data, scale, "int8")
    assert got.dtype == dtype and got.shape == (2, 5, m)
    # The GEMM takes bf16 activations and rounds its output to bf16 (int8_linear_cpu): each
    # rounding errs by at most 2^-9 relatively, so the sum of K such terms stays well inside 1%
    # of the largest output (measured: 0.2-0.4%).
    assert (got.float() - want).abs().max() <= 1e-2 * want.abs().max()
    # Rows one at a time give the same bits as rows together: the engine's batch equals a solo run.
    rows = x.reshape(-1, k)
    assert torch.equal(torch.cat([layer(r[None]) for r in rows]), layer(rows))


def test_narrow_int8_and_other_schemes_use_the_reference_exactly():
    torch.manual_seed(2)
    for scheme, k, group in (("int8", 24, 0), ("fp8", 64, 0), ("int4", 64, 32)):  # int8: K not a multiple of 16
        data, scale = quantize_tensor(torch.randn(7, k), scheme, group)
        layer = QuantLinear(k, 7, scheme, group)
        layer.weight, layer.weight_scale = data, scale
        x = torch.randn(3, k)
        assert torch.equal(layer(x), torch.nn.functional.linear(x, ref.dequantize_ref(data, scale, scheme, x.dtype)))


def test_fused_linears_compute_what_each_did_and_share_storage():
    torch.manual_seed(3)
    model = quantize_model(random_model(TINY), "int8")
    attn = model.backbone.layers[0].attn
    x = torch.randn(4, TINY.backbone.dim)
    apart = torch.cat([attn.wq(x), attn.wk(x), attn.wv(x)], dim=1)
    fused = quant.fuse([attn.wq, attn.wk, attn.wv])
    assert torch.equal(fused(x), apart) and torch.equal(attn.wq(x), apart[:, :attn.wq.out_features])
    assert attn.wv.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()


def test_plan_and_config_entry():
    assert QuantConfig.make("int4", PRESETS["miso-8b"]) == QuantConfig("int4", "int4", "int8", 128)
    assert QuantConfig.make("int4", TINY).group_size == 64  # tiny's backbone is 64 wide
    qc = QuantConfig.make("fp8", TINY)
    assert qc.scheme_for("decoder.layers.1.mlp.w_down.weight") == "fp8"
    for kept in ("codebook0_head.weight", "projection.weight", "audio_head", "text_embeddings.weight",
                 "backbone.layers.0.attn_norm.weight", "backbone.norm.weight"):
        assert qc.scheme_for(kept) is None
    assert QuantConfig.from_dict(qc.to_dict(), "x") == qc
    with pytest.raises(ValueError, match="unknown weights 'int3'"):
        QuantConfig.make("int3", TINY)
    with pytest.raises(ValueError, match="unknown quantisation scheme 'int2'"):
        QuantConfig.from_dict({**qc.to_dict(), "decoder": "int2"}, "x")


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_random_model_quantised_as_drawn_is_the_float_model_quantised(scheme):
    drawn = random_model(TINY, seed=3, weights=scheme).state_dict()
    after = quantize_model(random_model(TINY, seed=3), scheme).state_dict()
    assert drawn.keys() == after.keys()
    for name in drawn:
        assert drawn[name].dtype == after[name].dtype and torch.equal(drawn[name].view(torch.uint8),
                                                                      after[name].view(torch.uint8)), name
    # The size the memory check counts (from the config alone) is what the model holds.
    model = random_model(TINY, weights=scheme, dtype=torch.bfloat16)
    held = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    assert weight_bytes(TINY, torch.bfloat16, QuantConfig.make(scheme, TINY)) == held


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name].view(torch.uint8), sb[name].view(torch.uint8)), name


@pytest.fixture
def hf_dir(small_hf_dir, tmp_path):
    path = tmp_path / "hf"
    shutil.copytree(small_hf_dir, path)
    return path


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_load_quantises_and_convert_stores_a_checkpoint_that_loads_without_quantising(scheme, hf_dir, tmp_path,
                                                                                      monkeypatch):
    loaded, config, _ = load_model(hf_dir, weights=scheme, progress=False)
    _same_state(loaded, quantize_model(load_model(hf_dir, progress=False)[0], scheme))
    assert loaded.quantization == QuantConfig.make(scheme, config)

    out = convert(hf_dir, tmp_path / "q", weights=scheme, shard_size="100KB", progress=False)
    saved = json.loads((out / "config.json").read_text())
    assert saved["format"] == "misotts" and saved["quantization"] == QuantConfig.make(scheme, config).to_dict()

    def refuse(*args, **kwargs):
        raise AssertionError("a quantised checkpoint was quantised again")

    monkeypatch.setattr(quant, "quantize_tensor", refuse)
    again, again_config, _ = load_model(out, progress=False)
    assert again_config == config
    _same_state(again, loaded)
    _same_state(load_model(out, weights=scheme, progress=False)[0], loaded)
    other = next(s for s in quant.SCHEMES if s != scheme)
    with pytest.raises(ValueError, match=f"stored quantised as {scheme}: it loads as {scheme} only"):
        load_model(out, weights=other, progress=False)
    # converting the quantised checkpoint again copies it as it is
    _same_state(load_model(convert(out, tmp_path / "q2", progress=False), progress=False)[0], loaded)


def test_a_quantised_checkpoint_with_float_codes_is_refused(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    out = convert(hf_dir, tmp_path / "q", weights="int8", progress=False)
    tensors = load_file(out / "model.safetensors")
    name = "backbone.layers.0.attn.wq.weight"
    tensors[name] = tensors[name].float()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"quantised tensor\(s\) have the wrong dtype for int8: "
                                         r"'backbone\.layers\.0\.attn\.wq\.weight' in model\.safetensors is F32, "
                                         r"expected torch\.int8"):
        load_model(out, progress=False)


def test_schemes_a_device_cannot_run_are_refused():
    quant.check_device("int8", torch.device("cpu"))
    for scheme in ("fp8", "int4"):
        with pytest.raises(ValueError, match=f"--weights {scheme} .* has no CPU kernel here.*on the CPU use int8"):
            quant.check_device(scheme, torch.device("cpu"))


def test_a_model_that_fits_only_quantised_is_refused_with_the_advice(monkeypatch):
    from misotts.weights import memory

    csm = PRESETS["csm-1b"]
    int8 = weight_bytes(csm, torch.bfloat16, QuantConfig.make("int8", csm))
    assert int8 < 0.7 * weight_bytes(csm, torch.bfloat16)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int8 + 2**20)
    with pytest.raises(ValueError, match=r"csm-1b needs 2\.9 GiB for its weights in bfloat16 but cpu has 1\.9 GiB "
                                         r"free: quantised weights fit \(--weights int8 / weights='int8': 1\.9 GiB\)"):
        memory.check_fits(csm, torch.bfloat16, torch.device("cpu"))
    memory.check_fits(csm, torch.bfloat16, torch.device("cpu"), QuantConfig.make("int8", csm))  # fits
    # On a GPU int4 is offered when int8 does not fit either.
    int4 = weight_bytes(csm, torch.bfloat16, QuantConfig.make("int4", csm))
    monkeypatch.setattr(memory, "available_bytes", lambda device: int4 + 2**20)
    with pytest.raises(ValueError, match=r"with int8 weights but .*\(--weights int4 / weights='int4': 1\.5 GiB\)"):
        memory.check_fits(csm, torch.bfloat16, torch.device("cuda"), QuantConfig.make("int8", csm))


def test_misotts_load_with_weights(monkeypatch):
    import misotts

    with pytest.raises(ValueError, match="--weights fp8 / weights='fp8' has no CPU kernel"):
        misotts.load("tiny", device="cpu", weights="fp8", progress=False)
    with misotts.load("tiny", device="cpu", weights="int8", progress=False, backend="reference") as tts:
        info = tts.info()
        held = sum(t.nbytes for t in (*tts.model.parameters(), *tts.model.buffers()))
        assert info["weights"] == "int8" and info["weight_bytes"] == held == weight_bytes(
            TINY, torch.float32, QuantConfig.make("int8", TINY))
        assert info["parameters"] == TINY.num_parameters()
        assert isinstance(tts.model.backbone.layers[1].mlp.w_down, QuantLinear)


def test_cli_convert_and_info_with_weights(hf_dir, tmp_path, capsys):
    from misotts.cli import main

    assert main(["convert", str(hf_dir), str(tmp_path / "bad"), "--weights", "int3"]) == 2
    err = capsys.readouterr().err
    assert err == "misotts convert: error: unknown weights 'int3' (--weights / weights=): expected one of int8, fp8, int4\n"
    assert not (tmp_path / "bad").exists()
    assert main(["convert", str(hf_dir), str(tmp_path / "q"), "--weights", "int4"]) == 0
    capsys.readouterr()
    assert main(["info", "--model", str(tmp_path / "q"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    config = load_model(hf_dir, progress=False)[1]
    assert info["weights"] == "int4"  # named by the checkpoint, no --weights needed
    assert info["weight_bytes"] == weight_bytes(config, torch.float32, QuantConfig.make("int4", config))
