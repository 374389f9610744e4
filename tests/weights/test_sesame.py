"""Sesame's original checkpoints: torchtune names and q/k rows laid out for interleaved RoPE.

Sesame's config.json names its shapes by flavour, and the flavour table only has full-size
models, so these tests register small flavours (monkeypatch) equal to the transformers test
models' shapes, write those models under Sesame's names, and load them back.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from misotts.runtime.config import TransformerConfig
from misotts.runtime.generate import generate_codes
from misotts.runtime.model import apply_rope, rope_cos_sin, rope_inv_freq
from misotts.runtime.prompt import build_prompt
from misotts.runtime.tokenizer import ByteTokenizer
from misotts.weights import detect_format, load_model
from misotts.weights import formats
from misotts.weights.formats import interleaved_to_halves

from .hf_models import BOS, EOS

# Our names -> Sesame's (models.py + torchtune), written out by hand rather than taken from the loader.
SESAME_LEAVES = {
    "attn.wq.weight": "attn.q_proj.weight", "attn.wk.weight": "attn.k_proj.weight",
    "attn.wv.weight": "attn.v_proj.weight", "attn.wo.weight": "attn.output_proj.weight",
    "mlp.w_gate.weight": "mlp.w1.weight", "mlp.w_down.weight": "mlp.w2.weight", "mlp.w_up.weight": "mlp.w3.weight",
    "attn_norm.weight": "sa_norm.scale", "mlp_norm.weight": "mlp_norm.scale", "norm.weight": "norm.scale",
}


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from (first halves, second halves) back to pairs: Sesame row 2i + j is
    our row j * d/2 + i."""
    d = w.shape[0] // n_heads
    rows = [h * d + j * (d // 2) + i for h in range(n_heads) for i in range(d // 2) for j in range(2)]
    return w[rows]


def sesame_name(name: str) -> str:
    stack, _, rest = name.partition(".")
    if stack not in ("backbone", "decoder"):
        return name  # embeddings, heads and projection keep their names
    if rest.startswith("layers."):
        _, n, leaf = rest.split(".", 2)
        return f"{stack}.layers.{n}.{SESAME_LEAVES[leaf]}"
    return f"{stack}.{SESAME_LEAVES[rest]}"


def sesame_state_dict(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        cfg = model.config.backbone if name.startswith("backbone") else model.config.decoder
        if name.endswith("attn.wq.weight"):
            t = halves_to_interleaved(t, cfg.n_heads)
        elif name.endswith("attn.wk.weight"):
            t = halves_to_interleaved(t, cfg.n_kv_heads)
        out[sesame_name(name)] = t.clone()
    return out


def register_flavours(monkeypatch, config) -> dict:
    monkeypatch.setitem(formats.SESAME_FLAVORS, "test-backbone", config.backbone)
    monkeypatch.setitem(formats.SESAME_FLAVORS, "test-decoder", config.decoder)
    return {"backbone_flavor": "test-backbone", "decoder_flavor": "test-decoder",
            "text_vocab_size": config.text_vocab_size, "audio_vocab_size": config.audio_vocab_size,
            "audio_num_codebooks": config.num_codebooks}


def greedy(model):
    frames, mask = build_prompt("hello sesame", 0, [], ByteTokenizer(BOS, EOS))
    return generate_codes(model, frames, mask, 10, temperature=0, topk=1, stop_on_eos=False)


def test_permutation_turns_interleaved_rope_into_rotate_half():
    """Attention scores of Sesame's interleaved RoPE on the original rows equal ours (rotate
    halves) on the permuted rows, for GQA q (4 heads) and k (2 heads)."""
    cfg = TransformerConfig(dim=48, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=8, head_dim=16)
    g = torch.Generator().manual_seed(0)
    wq, wk = torch.randn(64, 48, generator=g), torch.randn(32, 48, generator=g)
    x, pos = torch.randn(1, 40, 48, generator=g), torch.arange(40)
    inv_freq = rope_inv_freq(cfg)

    def interleaved_rope(t):  # torchtune: rotate pairs (2i, 2i + 1) by angle pos * inv_freq[i]
        angle = pos[:, None, None].float() * inv_freq
        a, b = t.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], -1).flatten(-2)

    def scores(q, k):  # [B, S, H, d], [B, S, K, d] -> [H, S, S]
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        return torch.einsum("bshd,bthd->hst", q, k)

    heads = lambda t, n: t.unflatten(-1, (n, 16))  # noqa: E731
    sesame = scores(interleaved_rope(heads(x @ wq.T, 4)), interleaved_rope(heads(x @ wk.T, 2)))
    cos, sin = rope_cos_sin(cfg, pos, inv_freq)
    ours = lambda q, k: scores(apply_rope(heads(x @ q.T, 4), cos, sin), apply_rope(heads(x @ k.T, 2), cos, sin))  # noqa: E731
    # scores reach ~100: fp32 rounding of the two orders of operations is ~1e-5 of that
    torch.testing.assert_close(ours(interleaved_to_halves(wq, 4), interleaved_to_halves(wk, 2)), sesame,
                               rtol=1e-5, atol=1e-5 * sesame.abs().max().item())
    assert not torch.allclose(ours(wq, wk), sesame, atol=1.0)  # the permutation matters
    # and the tests' own inverse undoes it
    assert torch.equal(halves_to_interleaved(interleaved_to_halves(wq, 4), 4), wq)


def test_sesame_checkpoints_load_like_transformers(hf_checkpoint, tmp_path, monkeypatch):
    """The same weights under Sesame's names, as model.safetensors and as ckpt.pt, load to
    exactly the tensors the transformers checkpoint gives, hence the same greedy codes."""
    reference, config, _ = load_model(hf_checkpoint[0], progress=False)
    sd = sesame_state_dict(reference)
    assert "backbone.layers.1.attn.output_proj.weight" in sd and "decoder.norm.scale" in sd
    flavours = json.dumps(register_flavours(monkeypatch, config))
    for weights_file in ("model.safetensors", "ckpt.pt"):
        path = tmp_path / weights_file.replace(".", "-")
        path.mkdir()
        if weights_file == "ckpt.pt":
            # plus a buffer that Sesame's model may have saved along with its parameters
            torch.save({**sd, "backbone_causal_mask": torch.ones(4, 4, dtype=torch.bool)}, path / weights_file)
        else:
            save_file(sd, path / weights_file)
        (path / "config.json").write_text(flavours)

        assert detect_format(path) == "sesame"
        model, sesame_config, _ = load_model(path, progress=False)
        assert (sesame_config.backbone, sesame_config.decoder) == (config.backbone, config.decoder)
        loaded = model.state_dict()
        for name, t in reference.state_dict().items():
            assert torch.equal(loaded[name], t), f"{weights_file}: {name}"
    assert torch.equal(greedy(model), greedy(reference))


def test_config_less_ckpt_pt_is_sesame_csm_1b(tmp_path):
    """Sesame's first release was ckpt.pt alone, with CSM-1B's shapes hard-coded by its loader."""
    torch.save({"text_embeddings.weight": torch.zeros(4, 2)}, tmp_path / "ckpt.pt")
    assert detect_format(tmp_path) == "sesame"
    with pytest.raises(ValueError, match=r"sesame-llama-1B.*lacks .*audio_embeddings\.weight"):
        load_model(tmp_path, progress=False)
