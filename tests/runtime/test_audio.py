"""load_audio / resample / save_wav against files written here (WAVs with the stdlib) and sines computed analytically.

Resampling is soxr's: on tones up to 0.8 x the lower Nyquist frequency it is off the analytic sine
by <= 7.4e-5 per unit amplitude (measured; < 1e-6 up to 0.5 x), except within ~100 lower-rate
samples of either end, where the signal is taken as zero beyond the ends.  Tests allow 5e-5 on
tones of amplitude <= 0.5 and leave out 120 lower-rate samples at each end."""
import io
import math
import os
import struct
import wave

import numpy as np
import pytest
import torch

from misotts.runtime.audio import FRAME_MS, FRAME_S, FRAME_SAMPLES, SAMPLE_RATE, load_audio, resample, save_wav

QUANT_16 = 1 / 32768  # one 16-bit step
RESAMPLE_TOL = 5e-5


def interior(new_rate, orig_rate):
    """The output samples away from the ends' transients (120 lower-rate samples each side)."""
    edge = math.ceil(120 * new_rate / min(orig_rate, new_rate))
    return slice(edge, -edge)


def test_frame_constants():
    assert (SAMPLE_RATE, FRAME_SAMPLES, FRAME_MS, FRAME_S) == (24000, 1920, 80, 0.08)


def sine(freq, rate, seconds=1.0, amplitude=0.5, phase=0.3):
    """Float64 sine evaluated exactly at each sample time (the independent reference)."""
    t = np.arange(round(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t + phase)


def write_pcm_wav(path, samples, rate, width=2, channels=1):
    """Integer PCM WAV with the stdlib; samples are floats in [-1, 1], interleaved if channels > 1."""
    scale = 2 ** (8 * width - 1)
    ints = np.clip(np.round(np.asarray(samples) * scale), -scale, scale - 1).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    else:
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints) if width == 3 else ints.astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(raw)
    return ints / scale  # what the file holds, as floats


def write_float_wav(path, samples, rate):
    """32-bit IEEE-float WAV (format tag 3), which the stdlib wave module cannot write."""
    data = np.asarray(samples, "<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def peak_frequency(wav, rate):
    spectrum = np.abs(np.fft.rfft(np.asarray(wav, np.float64) * np.hanning(len(wav))))
    return np.argmax(spectrum) * rate / len(wav)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_widths_load_exactly(tmp_path, width):
    stored = write_pcm_wav(tmp_path / "a.wav", sine(440, 24000, 0.1), 24000, width)
    wav = load_audio(tmp_path / "a.wav")
    assert wav.dtype == torch.float32 and wav.shape == (2400,)
    # Exact up to float32 rounding of the stored integers / 2**(bits-1).
    np.testing.assert_allclose(wav.numpy(), stored, rtol=0, atol=1e-7)


def test_float_wav_loads_exactly(tmp_path):
    samples = sine(440, 24000, 0.1).astype(np.float32)
    write_float_wav(tmp_path / "f.wav", samples, 24000)
    assert torch.equal(load_audio(str(tmp_path / "f.wav")), torch.from_numpy(samples))


@pytest.mark.parametrize("rate", [16000, 44100])
def test_wav_at_other_rates_is_resampled_to_24k(tmp_path, rate):
    freq, amplitude = 1000.0, 0.5
    write_pcm_wav(tmp_path / "s.wav", sine(freq, rate, amplitude=amplitude), rate)
    wav = load_audio(tmp_path / "s.wav").numpy()
    assert wav.shape == (24000,)
    # 1 s at 24 kHz gives 1 Hz FFT bins: the peak must sit on the tone's bin.
    assert peak_frequency(wav, 24000) == pytest.approx(freq, abs=1)
    # Away from the ends (zero padded), the samples follow the analytic sine at 24 kHz to within
    # the file's 16-bit quantisation plus the resampler's passband error.
    inside = interior(24000, rate)
    np.testing.assert_allclose(wav[inside], sine(freq, 24000, amplitude=amplitude)[inside], rtol=0, atol=QUANT_16 + RESAMPLE_TOL)
    assert np.abs(wav[inside]).max() == pytest.approx(amplitude, rel=1e-3)


def test_save_load_round_trip_within_16_bit_quantisation(tmp_path):
    samples = torch.from_numpy(sine(440, 24000, amplitude=0.9)).float()
    path = tmp_path / "nested" / "dir" / "out.wav"  # save_wav creates the folders
    save_wav(path, samples)
    with wave.open(str(path)) as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()) == (1, 2, 24000, 24000)
    back = load_audio(path)
    assert (back - samples).abs().max().item() <= QUANT_16 / 2 + 1e-7  # rounding to the nearest step


def test_save_wav_clips_to_full_scale(tmp_path):
    save_wav(tmp_path / "c.wav", np.array([2.0, -2.0, 0.25], np.float32))
    with wave.open(str(tmp_path / "c.wav")) as f:
        assert np.frombuffer(f.readframes(3), "<i2").tolist() == [32767, -32768, 8192]
    with pytest.raises(ValueError, match="NaN or Inf"):
        save_wav(tmp_path / "nan.wav", torch.tensor([float("nan")]))
    save_wav(tmp_path / "empty.wav", torch.zeros(0))  # an empty generation still saves
    with wave.open(str(tmp_path / "empty.wav")) as f:
        assert f.getnframes() == 0


def test_arrays_and_tuples():
    samples = sine(440, 24000, 0.1).astype(np.float32)
    expected = torch.from_numpy(samples)
    assert torch.equal(load_audio(samples), expected)
    assert torch.equal(load_audio(torch.from_numpy(samples)[None]), expected)  # [1, N]
    assert torch.equal(load_audio((samples, 24000)), expected)
    from_16k = load_audio((sine(440, 16000, 0.1), 16000)).numpy()
    assert from_16k.shape == (2400,)
    inside = interior(24000, 16000)
    np.testing.assert_allclose(from_16k[inside], samples[inside], rtol=0, atol=RESAMPLE_TOL)


def test_stereo_files_are_mixed_down_with_a_warning(tmp_path):
    left = sine(440, 24000, 0.1, amplitude=0.5)
    interleaved = np.stack([left, np.zeros_like(left)], axis=1).reshape(-1)
    stored = write_pcm_wav(tmp_path / "stereo.wav", interleaved, 24000, channels=2).reshape(-1, 2)
    with pytest.warns(UserWarning, match="stereo.wav has 2 channels: mixed down to mono"):
        wav = load_audio(tmp_path / "stereo.wav")
    np.testing.assert_allclose(wav.numpy(), stored.mean(axis=1), rtol=0, atol=1e-7)


@pytest.mark.parametrize("fmt, subtype, tol", [
    ("flac", "PCM_16", QUANT_16),  # lossless: the 16-bit quantisation only
    ("ogg", "VORBIS", 0.05), ("mp3", "MPEG_LAYER_III", 0.05),  # lossy: the tone and its level survive
])
def test_compressed_formats_at_other_rates(tmp_path, fmt, subtype, tol):
    import soundfile

    freq, rate = 1000.0, 44100
    path = tmp_path / f"tone.{fmt}"
    soundfile.write(path, sine(freq, rate, amplitude=0.5), rate, subtype=subtype)
    wav = load_audio(path).numpy()
    assert abs(wav.shape[0] - 24000) < 24000 * 0.1  # lossy encoders may pad a frame
    assert peak_frequency(wav, 24000) == pytest.approx(freq, abs=2)
    middle = wav[6000:18000]
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.5 / np.sqrt(2), abs=tol)
    if fmt == "flac":
        inside = interior(24000, rate)
        np.testing.assert_allclose(wav[inside], sine(freq, 24000, amplitude=0.5)[inside], rtol=0, atol=QUANT_16 + RESAMPLE_TOL)


def test_unreadable_files_are_named(tmp_path):
    write_pcm_wav(tmp_path / "full.wav", sine(440, 24000, 0.1), 24000)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "full.wav").read_bytes()[:30])  # cut inside the header
    with pytest.raises(ValueError, match=r"cannot read audio file .*cut\.wav.*truncated"):
        load_audio(tmp_path / "cut.wav")
    (tmp_path / "notes.txt").write_text("not audio")
    with pytest.raises(ValueError, match=r"cannot read audio file .*notes\.txt"):
        load_audio(tmp_path / "notes.txt")


def test_a_corrupt_file_cannot_be_decoded_rather_than_does_not_exist(tmp_path):
    (tmp_path / "bad.mp3").write_bytes(b"garbage")  # libsndfile calls this "File does not exist"
    with pytest.raises(ValueError, match=r"bad\.mp3: cannot decode it") as caught:
        load_audio(tmp_path / "bad.mp3")
    assert "does not exist" not in str(caught.value)


def test_input_errors(tmp_path):
    with pytest.raises(ValueError, match="mix down to mono"):
        load_audio(torch.zeros(2, 100))
    write_pcm_wav(tmp_path / "empty.wav", np.zeros(0), 24000)
    with pytest.raises(ValueError, match="empty"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(ValueError, match="empty"):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_audio(torch.tensor([0.0, float("nan"), 0.1]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_audio((np.array([0.0, np.inf]), 16000))
    with pytest.raises(ValueError, match="float samples"):
        load_audio(np.zeros(10, np.int16))
    missing = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(missing)


@pytest.mark.parametrize("orig,new", [(44100, 24000), (16000, 24000), (48000, 24000), (24000, 22050)])
def test_resample_matches_analytic_sines(orig, new):
    # Two tones inside the passband (up to 0.8 x the lower Nyquist frequency), in float32.
    low_nyquist = min(orig, new) / 2
    tones = [(0.05 * low_nyquist, 0.4), (0.8 * low_nyquist, 0.3)]
    x = sum(sine(f, orig, 0.5, a) for f, a in tones)
    y = resample(torch.from_numpy(x).float(), orig, new).numpy()
    assert y.shape == (round(len(x) * new / orig),)
    expected = sum(sine(f, new, 0.5, a) for f, a in tones)
    inside = interior(new, orig)
    np.testing.assert_allclose(y[inside], expected[inside], rtol=0, atol=RESAMPLE_TOL)


def test_resample_rejects_aliases_and_images():
    # 44.1 -> 24 kHz: 12.6 and 15 kHz are above the new Nyquist frequency (12 kHz) and must not
    # alias to 11.4 and 9 kHz.
    for freq in (12600, 15000):
        y = resample(torch.from_numpy(sine(freq, 44100)).float(), 44100, 24000)
        assert y[100:-100].abs().max().item() < 1e-4  # > 70 dB below the tone's 0.5
    # 16 -> 24 kHz: a 6 kHz tone must not leave an image at 16 - 6 = 10 kHz (1 Hz FFT bins).
    y = resample(torch.from_numpy(sine(6000, 16000)).float(), 16000, 24000).numpy()
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert spectrum[10000] < 1e-4 * spectrum[6000]  # > 80 dB down


def test_resample_batches_over_leading_axes():
    x = torch.randn(2, 3, 441, dtype=torch.float64)
    y = resample(x, 44100, 24000)
    assert y.shape == (2, 3, 240)
    assert torch.allclose(y[1, 2], resample(x[1, 2], 44100, 24000), rtol=0, atol=1e-12)
    assert resample(x, 24000, 24000) is x


def test_save_wav_is_atomic(tmp_path, monkeypatch):
    """A write that fails (disk full, file-size limit) leaves the old file as it was and nothing else."""
    import soundfile

    path = tmp_path / "out.wav"
    save_wav(path, torch.full((100,), 0.25))
    before = path.read_bytes()

    def disk_full(file, *args, **kwargs):
        file.write(b"RIFF")  # part of a file, then the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(soundfile, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_wav(path, torch.zeros(1000))
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.wav"]


def test_save_wav_gives_new_files_the_umask_mode_and_keeps_an_old_files_mode(tmp_path):
    """Written through a temporary file (mkstemp: 0600), the result still has a plain open()'s mode."""
    umask = os.umask(0o022)
    try:
        save_wav(tmp_path / "new.wav", torch.zeros(10))
        assert (tmp_path / "new.wav").stat().st_mode & 0o777 == 0o644
        (tmp_path / "new.wav").chmod(0o600)
        save_wav(tmp_path / "new.wav", torch.zeros(20))
        assert (tmp_path / "new.wav").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(umask)


def test_save_wav_errors_and_paths(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="sample rate must be a positive integer"):
        save_wav(tmp_path / "zero.wav", torch.zeros(10), sample_rate=0)
    assert not (tmp_path / "zero.wav").exists()
    with pytest.raises(IsADirectoryError, match="is a directory: name a file"):
        save_wav(tmp_path, torch.zeros(10))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert save_wav("~/home.wav", torch.zeros(10)) == tmp_path / "home.wav"
    assert (tmp_path / "home.wav").is_file() and not (tmp_path / "~").exists()
    buffer = io.BytesIO()  # a file object, e.g. stdout
    save_wav(buffer, torch.full((10,), 0.5))
    buffer.seek(0)
    with wave.open(buffer) as f:
        assert (f.getframerate(), f.getnframes(), np.frombuffer(f.readframes(10), "<i2")[0]) == (24000, 10, 16384)
