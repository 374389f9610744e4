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


def set_config(path, change):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(change(config)))


@pytest.mark.parametrize("change, message", [
    (lambda c: [c], r"config\.json must hold a JSON object .*got a list"),
    (lambda c: {k: v for k, v in c.items() if k != "backbone"}, r"config\.json is not a valid MisoTTS config: lacks 'backbone'"),
    (lambda c: {**c, "backbone": {**c["backbone"], "dim": "64"}}, r"backbone: dim must be an integer >= 1, got '64'"),
    (lambda c: {**c, "backbone": {**c["backbone"], "max_seq_len": 0}}, r"backbone: max_seq_len must be an integer >= 1, got 0"),
    (lambda c: {**c, "decoder": {**c["decoder"], "n_layers": True}}, r"decoder: n_layers must be an integer >= 1, got True"),
    (lambda c: {**c, "backbone": {**c["backbone"], "depth": 3}}, r"backbone: .*unexpected keyword argument 'depth'"),
    (lambda c: {**c, "bos_id": -1}, r"bos_id must be an integer >= 0, got -1"),
    (lambda c: {**c, "colour": "red"}, r"unexpected keyword argument 'colour'"),
])
def test_bad_config_json_is_named(tiny_dir, change, message):
    set_config(tiny_dir, change)
    with pytest.raises(ValueError, match=message):
        load_model(tiny_dir, progress=False)


def test_special_ids_outside_the_vocabulary_are_refused_at_load(tiny_dir):
    import misotts

    set_config(tiny_dir, lambda c: {**c, "eos_id": 300})
    with pytest.raises(ValueError, match=r"eos_id 300 is outside the model's text vocabulary of 258 ids \(fix config\.json"):
        misotts.load(tiny_dir, device="cpu", progress=False, backend="reference")


def test_bad_transformers_config_is_named(small_hf_dir, tmp_path):
    path = tmp_path / "hf"
    shutil.copytree(small_hf_dir, path)
    set_config(path, lambda c: {**c, "depth_decoder_config": {**c["depth_decoder_config"], "hidden_size": "64"}})
    with pytest.raises(ValueError, match=r"not a valid transformers CSM config: depth_decoder_config: dim must be an integer"):
        load_model(path, progress=False)
    set_config(path, lambda c: {k: v for k, v in c.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match=r"not a valid transformers CSM config: backbone: lacks 'hidden_size'"):
        load_model(path, progress=False)


def test_info_on_a_bad_config_is_one_line(tiny_dir, capsys):
    from misotts.cli import main

    set_config(tiny_dir, lambda c: [c])
    assert main(["info", "--model", str(tiny_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must hold a JSON object" in err


def test_integer_tensors_relabelled_in_the_header_are_refused(tiny_dir):
    data = (tiny_dir / "model.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = data[8:8 + header_len].decode()
    start = header.index('"projection.weight"')
    relabelled = header[:start] + header[start:].replace('"F32"', '"I32"', 1)  # same size: shapes still fit
    (tiny_dir / "model.safetensors").write_bytes(data[:8] + relabelled.encode() + data[8 + header_len:])
    with pytest.raises(ValueError, match=r"1 tensor\(s\) are not floating point: 'projection\.weight' in model\.safetensors is I32"):
        load_model(tiny_dir, progress=False)


@pytest.mark.parametrize("shard", ["../outside/model.safetensors", "/tmp/model.safetensors", "sub/../../x.safetensors"])
def test_a_shard_outside_the_checkpoint_folder_is_refused(tiny_dir, tmp_path, shard):
    out = convert(tiny_dir, tmp_path / "sharded", shard_size=200_000, progress=False)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tiny_dir / "model.safetensors", outside / "model.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"] = dict.fromkeys(index["weight_map"], shard)
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"names shard '{shard}', outside the checkpoint folder: refused"):
        load_model(out, progress=False)


def test_a_missing_tokenizer_path_is_named(tmp_path):
    import misotts

    with pytest.raises(FileNotFoundError, match=r"tokenizer file not found: .*nope\.json \(--tokenizer / tokenizer=\)"):
        misotts.load("tiny", device="cpu", tokenizer=tmp_path / "nope.json", progress=False)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"cannot read tokenizer .*bad\.json \(--tokenizer / tokenizer=\)"):
        misotts.load("tiny", device="cpu", tokenizer=tmp_path / "bad.json", progress=False)
