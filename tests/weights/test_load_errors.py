"""A bad checkpoint fails before any weight is copied, with an error naming the tensor or file."""
import json
import shutil

import huggingface_hub.constants
import pytest
from safetensors.torch import load_file, save_file

from misotts.runtime.config import PRESETS
from misotts.weights import convert, load_model, random_model


@pytest.fixture
def tiny_dir(tmp_path):
    """A canonical-format checkpoint of the tiny preset, written by hand (not by convert)."""
    config = PRESETS["tiny"]
    path = tmp_path / "tiny"
    path.mkdir()
    save_file(random_model(config).state_dict(), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    return path


def rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


def test_the_fixture_loads(tiny_dir):
    model, config, checkpoint_dir = load_model(tiny_dir, progress=False)
    assert config == PRESETS["tiny"] and checkpoint_dir == tiny_dir


def test_missing_tensor(tiny_dir):
    rewrite(tiny_dir, lambda t: t.pop("decoder.layers.1.mlp.w_up.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*decoder\.layers\.1\.mlp\.w_up\.weight"):
        load_model(tiny_dir, progress=False)


def test_missing_tensor_is_named_as_the_format_names_it(small_hf_dir, tmp_path):
    path = tmp_path / "hf"
    shutil.copytree(small_hf_dir, path)
    rewrite(path, lambda t: t.pop("backbone_model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"\(hf format.*lacks 1 tensor.*backbone_model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(path, progress=False)


def test_unexpected_tensor(tiny_dir):
    rewrite(tiny_dir, lambda t: t.update({"backbone.layers.2.attn_norm.weight": t["backbone.norm.weight"].clone()}))
    with pytest.raises(ValueError, match=r"1 tensor\(s\) the model does not: 'backbone\.layers\.2\.attn_norm\.weight' in model\.safetensors"):
        load_model(tiny_dir, progress=False)


def test_unknown_name_in_hf_checkpoint(small_hf_dir, tmp_path):
    path = tmp_path / "hf"
    shutil.copytree(small_hf_dir, path)
    rewrite(path, lambda t: t.update({"backbone_model.rotary_emb.extra": t["lm_head.weight"].clone()}))
    with pytest.raises(ValueError, match=r"the model does not: 'backbone_model\.rotary_emb\.extra' in model\.safetensors"):
        load_model(path, progress=False)


def test_wrong_shape(tiny_dir):
    rewrite(tiny_dir, lambda t: t.update({"projection.weight": t["projection.weight"][:, :-1].clone()}))
    with pytest.raises(ValueError, match=r"'projection\.weight' in model\.safetensors has shape \(32, 63\), expected \(32, 64\)"):
        load_model(tiny_dir, progress=False)


def test_truncated_file(tiny_dir):
    data = (tiny_dir / "model.safetensors").read_bytes()
    (tiny_dir / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=r"tiny/model\.safetensors.*truncated or corrupt"):
        load_model(tiny_dir, progress=False)


def test_corrupt_header(tiny_dir):
    data = bytearray((tiny_dir / "model.safetensors").read_bytes())
    data[8:24] = b"#" * 16  # the JSON header starts at byte 8
    (tiny_dir / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tiny/model\.safetensors.*truncated or corrupt"):
        load_model(tiny_dir, progress=False)


def test_corrupt_ckpt_pt(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a torch checkpoint")
    with pytest.raises(ValueError, match=r"ckpt\.pt.*truncated or corrupt"):
        load_model(tmp_path, progress=False)


def test_missing_shard(tiny_dir, tmp_path):
    out = convert(tiny_dir, tmp_path / "sharded", shard_size=200_000, progress=False)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard {shards[1].name} named by .*model\.safetensors\.index\.json is missing"):
        load_model(out, progress=False)


def test_unknown_format(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"found: config\.json, pytorch_model\.bin\)\. Supported: ours .*transformers CSM.*Sesame"):
        load_model(tmp_path, progress=False)


def test_config_without_weights(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no checkpoint in a format we read \(found: config\.json\)"):
        load_model(tiny_dir, progress=False)


def test_missing_directory_and_file_path(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_model(tmp_path / "no" / "such" / "dir", progress=False)
    with pytest.raises(ValueError, match="pass the checkpoint directory"):
        load_model(tiny_dir / "model.safetensors", progress=False)


def test_relative_path_is_not_a_hub_id(tmp_path, monkeypatch):
    """'../ckpt' has the owner/name shape but is a path: reported missing, not looked up on the hub."""
    monkeypatch.chdir(tmp_path)
    for missing in ("../no-such-ckpt", "./no/such-ckpt"):
        with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
            load_model(missing, progress=False)


def test_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder called sesame/csm-1b
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(FileNotFoundError, match=r"'sesame/csm-1b' is not a local directory.*Pass a local checkpoint directory instead \(--model DIR / source=DIR\)"):
        load_model("sesame/csm-1b", progress=False)
