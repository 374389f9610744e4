"""Fixtures of the weights tests: transformers CSM checkpoints on disk (see hf_models.py)."""
import pytest

from .hf_models import HF_SHAPES, build_hf_model, one_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session", params=list(HF_SHAPES))
def hf_checkpoint(request, tmp_path_factory):
    """(directory written by save_pretrained, the transformers model read back from it)."""
    from transformers import CsmForConditionalGeneration

    path = tmp_path_factory.mktemp(f"hf-{request.param}")
    with one_thread():
        build_hf_model(request.param).save_pretrained(path)
        return path, CsmForConditionalGeneration.from_pretrained(path).eval()


@pytest.fixture(scope="session")
def small_hf_dir(tmp_path_factory):
    """A transformers-format checkpoint without the codec tensors (a few MB), for tests that
    copy or damage files; one shape only."""
    from safetensors.torch import load_file, save_file

    src = tmp_path_factory.mktemp("hf-full")
    with one_thread():
        build_hf_model("gqa2-hd64", seed=1).save_pretrained(src)
    dst = tmp_path_factory.mktemp("hf-small")
    tensors = {k: v for k, v in load_file(src / "model.safetensors").items() if not k.startswith("codec_model.")}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst
