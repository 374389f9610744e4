"""convert: any format -> ours, sharded or not, and back through load_model unchanged."""
import json
import shutil

import pytest
import torch

from misotts.runtime.generate import generate_codes
from misotts.runtime.prompt import build_prompt
from misotts.runtime.tokenizer import ByteTokenizer
from misotts.weights import convert, detect_format, load_model
from misotts.weights.convert import parse_size

from .hf_models import BOS, EOS


@pytest.fixture
def hf_dir(small_hf_dir, tmp_path):
    path = tmp_path / "hf"
    shutil.copytree(small_hf_dir, path)
    (path / "tokenizer.json").write_text('{"stand-in": true}')
    return path


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    frames, mask = build_prompt("convert me", 0, [], ByteTokenizer(BOS, EOS))
    codes = [generate_codes(m, frames, mask, 10, temperature=0, topk=1, stop_on_eos=False) for m in (a, b)]
    assert torch.equal(*codes)


def test_hf_to_sharded_canonical_round_trip(hf_dir, tmp_path):
    limit = 300_000
    out = convert(hf_dir, tmp_path / "out", shard_size=limit, progress=False)
    shards = sorted(out.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 2 and [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists() and not list(out.glob("*.partial"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    # a shard exceeds the limit only when one tensor alone does
    by_shard = {}
    for name, shard in index["weight_map"].items():
        by_shard.setdefault(shard, []).append(name)
    reference, config, _ = load_model(hf_dir, progress=False)
    sd = reference.state_dict()
    for names in by_shard.values():
        assert len(names) == 1 or sum(sd[n].nbytes for n in names) <= limit
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in sd.values())
    assert json.loads((out / "config.json").read_text())["format"] == "misotts"
    assert (out / "tokenizer.json").read_text() == '{"stand-in": true}'

    assert detect_format(out) == "misotts"
    converted, converted_config, checkpoint_dir = load_model(out, progress=False)
    assert converted_config == config and checkpoint_dir == out
    assert_same_model(converted, reference)


def test_overwrite_and_single_file(hf_dir, tmp_path):
    out = convert(hf_dir, tmp_path / "out", shard_size="300KB", progress=False)
    with pytest.raises(FileExistsError, match=r"not empty: pass --overwrite \(overwrite=True\)"):
        convert(hf_dir, out, progress=False)
    convert(hf_dir, out, shard_size="1GB", overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert_same_model(load_model(out, progress=False)[0], load_model(hf_dir, progress=False)[0])
    with pytest.raises(ValueError, match="overwrite its source"):
        convert(out, out, overwrite=True, progress=False)


def test_convert_can_cast(hf_dir, tmp_path):
    out = convert(hf_dir, tmp_path / "bf16", dtype=torch.bfloat16, progress=False)
    bf16, _, _ = load_model(out, dtype=torch.bfloat16, progress=False)
    reference, _, _ = load_model(hf_dir, dtype=torch.bfloat16, progress=False)
    assert_same_model(bf16, reference)


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500 mb") == 5 * 10**8
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("4096") == 4096
    for bad in ("lots", "2TB", 0, "-1GB"):
        with pytest.raises(ValueError):
            parse_size(bad)
