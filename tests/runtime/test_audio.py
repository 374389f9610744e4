"""load_audio / resample / save_wav against WAVs written here with the stdlib and sines computed analytically."""
import math
import struct
import wave

import numpy as np
import pytest
import torch

from misotts.runtime.audio import FRAME_MS, FRAME_S, FRAME_SAMPLES, SAMPLE_RATE, load_audio, resample, save_wav

QUANT_16 = 1 / 32768  # one 16-bit step


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
    # the file's 16-bit quantisation plus the resampler's < 1e-5 passband error.
    interior = slice(100, -100)
    np.testing.assert_allclose(wav[interior], sine(freq, 24000, amplitude=amplitude)[interior], rtol=0, atol=QUANT_16 + 2e-5)
    assert np.abs(wav[interior]).max() == pytest.approx(amplitude, rel=1e-3)


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
    np.testing.assert_allclose(from_16k[100:-100], samples[100:-100], rtol=0, atol=2e-5)


def test_input_errors(tmp_path):
    write_pcm_wav(tmp_path / "stereo.wav", np.zeros(200), 24000, channels=2)
    with pytest.raises(ValueError, match="mix down to mono"):
        load_audio(tmp_path / "stereo.wav")
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
    assert y.shape == (math.ceil(len(x) * new / orig),)
    expected = sum(sine(f, new, 0.5, a) for f, a in tones)
    edge = 100  # > the filter's reach of ~35 lower-rate samples
    np.testing.assert_allclose(y[edge:-edge], expected[edge:-edge], rtol=0, atol=2e-5)


def test_resample_rejects_aliases_and_images():
    # 44.1 -> 24 kHz: 12.6 and 15 kHz are above the new Nyquist frequency (12 kHz) and must not
    # alias to 11.4 and 9 kHz.
    for freq in (12600, 15000):
        y = resample(torch.from_numpy(sine(freq, 44100)).float(), 44100, 24000)
        assert y[100:-100].abs().max().item() < 1e-4  # > 70 dB below the tone's 0.5
    # 16 -> 24 kHz: a 6 kHz tone must not leave an image at 16 - 6 = 10 kHz.
    y = resample(torch.from_numpy(sine(6000, 16000)).float(), 16000, 24000).numpy()
    residual = y[100:-100] - sine(6000, 24000)[100:-100]
    assert np.abs(residual).max() < 2e-5


def test_resample_batches_over_leading_axes():
    x = torch.randn(2, 3, 441, dtype=torch.float64)
    y = resample(x, 44100, 24000)
    assert y.shape == (2, 3, 240)
    assert torch.allclose(y[1, 2], resample(x[1, 2], 44100, 24000), rtol=0, atol=1e-12)
    assert resample(x, 24000, 24000) is x
