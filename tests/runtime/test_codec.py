"""MimiCodec on the untrained (seeded, offline) Mimi: shapes, determinism, streaming, validation.

Mimi costs ~0.1 s per frame on a CPU, so these tests use 2-3 frames.
"""
import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from misotts.runtime.audio import FRAME_SAMPLES, SAMPLE_RATE
from misotts.runtime.codec import load_codec

FRAME = 1920


@pytest.fixture(scope="module")
def codec():
    return load_codec(None)


def random_codes(frames, seed=0, batch=()):
    return torch.randint(0, 2048, (*batch, frames, 32), generator=torch.Generator().manual_seed(seed))


def noise(samples, seed=0):
    return torch.randn(samples, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_untrained_codec_is_deterministic_and_leaves_global_rng_alone(codec):
    rng_before = torch.get_rng_state()
    again = load_codec(None)
    assert torch.equal(torch.get_rng_state(), rng_before)
    ours, theirs = codec.mimi.state_dict(), again.mimi.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert (codec.sample_rate, codec.frame_size, codec.num_codebooks) == (24000, 1920, 32)
    assert codec.sample_rate / codec.frame_size == 12.5
    assert (codec.sample_rate, codec.frame_size) == (SAMPLE_RATE, FRAME_SAMPLES)  # our constants are Mimi's


def test_encode_shape_range_and_determinism(codec):
    wav = noise(FRAME + 100)  # a partial last frame still makes a frame: T = ceil(N / 1920)
    codes = codec.encode(wav)
    assert codes.shape == (2, 32) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < 2048
    assert torch.equal(codec.encode(wav), codes)
    # Codes follow the input: other noise gives mostly other codes.
    assert (codec.encode(noise(FRAME + 100, seed=1)) != codes).float().mean() > 0.5
    assert codec.encode(noise(FRAME)).shape == (1, 32)


def test_decode_gives_1920_samples_per_frame(codec):
    codes = random_codes(2)
    wav = codec.decode(codes)
    assert wav.shape == (2 * FRAME,) and wav.dtype == torch.float32
    assert torch.isfinite(wav).all()
    assert torch.equal(codec.decode(codes), wav)
    assert not wav.requires_grad and not wav.is_inference()  # callers may edit it in place


def rms(x):
    return x.pow(2).mean().sqrt().item()


def test_untrained_decode_depends_clearly_on_the_codes(codec):
    """The untrained Mimi must not hum the same waveform for every code sequence, or no test that
    compares samples could tell codes apart.  moshi's default initialisation decoded everything to
    a DC offset of 0.14 (std 0.014) where entirely different codes moved samples by <= 4e-4:
    an RMS difference of ~0.003 of the signal's RMS."""
    wav = codec.decode(random_codes(4))
    other = codec.decode(random_codes(4, seed=1))
    # Independent signals differ by sqrt(2) x their RMS; ask for at least half the signal's RMS.
    assert rms(other - wav) > 0.5 * rms(wav)
    assert abs(wav.mean().item()) < 0.2 * rms(wav)  # no DC offset dominating the output
    # One code of one codebook in one frame changes that frame audibly (> 1% of full scale).
    for codebook in (0, 31):
        nudged = random_codes(4)
        nudged[2, codebook] = (nudged[2, codebook] + 1) % 2048
        assert (codec.decode(nudged) - wav).abs().max() > 0.01, codebook


def test_stream_decode_equals_whole_decode(codec):
    codes = random_codes(3, batch=(2,))  # two different streams decoded side by side
    whole = torch.stack([codec.decode(c) for c in codes])
    with codec.stream_decoder(batch_size=2) as stream:
        frames = [stream.decode_frame(codes[:, t]) for t in range(3)]
        assert all(f.shape == (2, FRAME) and f.dtype == torch.float32 for f in frames)
    streamed = torch.cat(frames, dim=1)
    # Same float32 maths, only chunked differently (convolution state carried across frames), so
    # they differ by summation-order rounding: ~1e-7 measured on outputs up to ~0.2. Losing the
    # state between frames, or other codes, would move the output by ~0.1.
    assert whole.abs().max() > 0.05
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-6)
    # Closed again, the codec decodes whole sequences (Mimi is causal: one frame = the first 1920 samples).
    torch.testing.assert_close(codec.decode(codes[0, :1]), whole[0, :FRAME], rtol=0, atol=1e-6)


def test_stream_decoder_guards_the_shared_state(codec):
    stream = codec.stream_decoder()
    stream.decode_frame(random_codes(1))  # opens on first use
    with pytest.raises(RuntimeError, match="stream decoder is open"):
        codec.decode(random_codes(1))
    with pytest.raises(RuntimeError, match="stream decoder is open"):
        codec.stream_decoder().open()
    with pytest.raises(ValueError, match=r"shape \[B, 32\]"):
        stream.decode_frame(random_codes(2))  # batch of 2 on a batch-1 stream
    stream.close()
    assert codec.decode(random_codes(1)).shape == (FRAME,)


@pytest.mark.parametrize(
    "bad_codes, message",
    [
        (torch.full((2, 32), 2048), r"0\.\.2047"),
        (torch.full((2, 32), -1), r"0\.\.2047"),
        (torch.tensor(5), "shape"),
        (torch.zeros(32, dtype=torch.long), "shape"),
        (torch.zeros(2, 31, dtype=torch.long), "shape"),
        (torch.zeros(1, 2, 32, dtype=torch.long), "shape"),
        (torch.zeros(0, 32, dtype=torch.long), "at least one frame"),
        (torch.zeros(2, 32), "integer"),
        ([[0] * 32], "integer"),
    ],
)
def test_decode_validates_codes(codec, bad_codes, message):
    with pytest.raises(ValueError, match=message):
        codec.decode(bad_codes)


@pytest.mark.parametrize("bad_wav", [torch.zeros(1, FRAME), torch.zeros(0), torch.zeros(FRAME, dtype=torch.int16)])
def test_encode_validates_audio(codec, bad_wav):
    with pytest.raises(ValueError, match="1-D float"):
        codec.encode(bad_wav)


def test_load_codec_errors(tmp_path, monkeypatch):
    missing = tmp_path / "mimi.safetensors"
    with pytest.raises(FileNotFoundError, match="mimi.safetensors"):
        load_codec(str(missing))
    # Offline (and an empty cache, so a cached download cannot satisfy it): the error says to pass a file.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for hub_id in ["hub", "kyutai/moshiko-pytorch-bf16"]:
        with pytest.raises(FileNotFoundError, match=r"pass a local file instead \(--codec on the command line, codec= in"):
            load_codec(hub_id)
    not_weights = tmp_path / "notes.txt"
    not_weights.write_text("not a codec")
    with pytest.raises(ValueError, match=r"cannot read Mimi weights .*notes\.txt.*--codec on the command line"):
        load_codec(not_weights)
    with pytest.raises(ValueError, match=r"holds no Mimi codec .*--codec"):
        load_codec(tmp_path)  # a folder without codec_model.* tensors


def test_load_codec_from_local_safetensors(codec, tmp_path):
    # The published Mimi file is bf16; write our untrained weights the same way and load them back.
    weights = {name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in codec.mimi.state_dict().items()}
    path = tmp_path / "mimi.safetensors"
    save_file(weights, str(path))
    loaded = load_codec(str(path)).mimi.state_dict()
    path.unlink()  # ~190 MB
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[name], weights[name].to(loaded[name].dtype)) for name in weights)



def test_a_cached_hub_codec_is_used_without_asking_the_hub(codec, tmp_path, monkeypatch):
    """Offline with the Mimi in the hub cache: loaded from there, with no network call (whose
    retries cost half a minute when the network is down)."""
    import huggingface_hub
    from moshi.models import loaders

    cache = tmp_path / "hf-cache"
    repo = "kyutai/moshiko-pytorch-bf16"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in codec.mimi.state_dict().items()}, str(snapshot / loaders.MIMI_NAME))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    loaded = load_codec(repo).mimi.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in codec.mimi.state_dict().items())
