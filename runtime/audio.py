"""Audio in and out: audio files and arrays to mono float32 at 24 kHz (Mimi's rate), and WAV back.

Decoding is libsndfile's (soundfile), resampling soxr's."""
from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch

# Mimi's audio: every other definition imports these.
SAMPLE_RATE = 24_000  # samples per second
FRAME_SAMPLES = 1920  # samples per frame (one code per codebook): 12.5 frames/s
FRAME_MS = 1000 * FRAME_SAMPLES // SAMPLE_RATE  # 80 ms of audio per frame
FRAME_S = FRAME_SAMPLES / SAMPLE_RATE  # 0.08 s

MIN_SAMPLE_RATE = 8_000  # below telephone audio a rate is a mistake (say a (samples, 1) tuple), not speech


def load_audio(source, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Mono float32 samples [N] at ``sample_rate`` from any of:

    * a path to an audio file that libsndfile reads (WAV, FLAC, MP3, OGG/Vorbis/Opus, AIFF, ...);
      several channels are averaged to one, with a warning,
    * a tuple ``(samples, rate)``,
    * bare samples (torch tensor or numpy array), taken to be at ``sample_rate`` already.

    Samples are floats in [-1, 1], shaped [N] or [1, N]. Other rates are resampled (soxr).
    """
    samples, rate = _samples_and_rate(source, sample_rate)
    return resample(_as_mono(samples), rate, sample_rate).contiguous()


def audio_seconds(source, sample_rate: int = SAMPLE_RATE) -> float:
    """How long `source` (as `load_audio` takes it) lasts, from its length and rate alone:
    nothing is resampled, so a size can be refused before any work."""
    length, rate = audio_length(source, sample_rate)
    return length / rate


def audio_frames(source, sample_rate: int = SAMPLE_RATE) -> int:
    """Mimi frames (of FRAME_SAMPLES at 24 kHz) that `source` makes, from its length and rate
    alone, in exact arithmetic (a whole number of frames is not rounded up by float error)."""
    length, rate = audio_length(source, sample_rate)
    return -(-length * SAMPLE_RATE // (int(rate) * FRAME_SAMPLES))


def audio_length(source, sample_rate: int = SAMPLE_RATE) -> tuple[int, int]:
    """(samples, rate) of `source` (as `load_audio` takes it): a file's header, or an array's shape."""
    if isinstance(source, (str, os.PathLike)) and Path(source).expanduser().is_file():
        try:
            info = soundfile.info(str(Path(source).expanduser()))  # the header only
        except soundfile.SoundFileError:
            pass  # read_audio_file below names the problem
        else:
            return info.frames, _checked_rate(info.samplerate)
    samples, rate = _samples_and_rate(source, sample_rate)
    return (int(np.shape(samples)[-1]) if np.ndim(samples) else 0), rate


def _samples_and_rate(source, sample_rate: int):
    if isinstance(source, (str, os.PathLike)):
        samples, rate = read_audio_file(Path(source).expanduser())
    elif isinstance(source, tuple) and len(source) == 2:
        samples, rate = source
    else:
        samples, rate = source, sample_rate
    return samples, _checked_rate(rate)


def _checked_rate(rate) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)) or int(rate) != rate:
        raise ValueError(f"sample rate must be an integer number of Hz, got {rate!r}")
    if rate < MIN_SAMPLE_RATE:
        raise ValueError(f"sample rate {rate} Hz is below {MIN_SAMPLE_RATE} Hz: audio is given as samples at "
                         f"24 kHz, a (samples, rate) tuple or a WAV file")
    return int(rate)


def read_audio_file(path: Path) -> tuple[np.ndarray, int]:
    """Samples [N] as float32 in [-1, 1] and the sample rate of an audio file, mixed down to mono."""
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # [N, channels]
    except soundfile.SoundFileError:
        # libsndfile says "File does not exist" of a file it cannot parse: the file is there (checked above)
        raise ValueError(f"cannot read audio file {path}: cannot decode it (truncated, or not a format libsndfile "
                         "reads: WAV, FLAC, MP3, OGG, AIFF, ...)") from None
    if samples.shape[1] > 1:
        warnings.warn(f"{path} has {samples.shape[1]} channels: mixed down to mono (their average)", stacklevel=3)
    return samples.mean(axis=1, dtype=np.float32), rate


def save_wav(path, samples, sample_rate: int = SAMPLE_RATE) -> Path | None:
    """Write mono samples [N] (floats, clipped to [-1, 1]) as a 16-bit PCM WAV, creating folders.

    `path` may be a binary file object (e.g. sys.stdout.buffer).  A file is written under a
    temporary name beside it and renamed over `path` once complete, so a failed write (disk
    full, size limit) leaves any old file as it was and no partial one.  Returns the path written
    (``~`` expanded), None for a file object."""
    # Scaled by 32768 as readers divide by it (libsndfile's own float writer scales by 32767).
    pcm = np.clip(np.round(_as_mono(samples, allow_empty=True).numpy().astype(np.float64) * 32768), -32768, 32767)
    pcm = pcm.astype(np.int16)
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample rate must be a positive integer, got {sample_rate!r}")
    if not isinstance(path, (str, os.PathLike)):
        # Made whole in memory first: a pipe cannot seek back to fill in the header's sizes.
        buffer = io.BytesIO()
        soundfile.write(buffer, pcm, int(sample_rate), subtype="PCM_16", format="WAV")
        path.write(buffer.getvalue())
        return None
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: name a file to write the WAV to")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            soundfile.write(f, pcm, int(sample_rate), subtype="PCM_16", format="WAV")
        os.chmod(tmp, _mode_for(path))  # mkstemp makes 0600; the file gets what a plain open() would give it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _mode_for(path: Path) -> int:
    """The permissions of the file being replaced, or of a new file under the process's umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Resample the last axis of ``wav`` from ``orig_rate`` to ``new_rate`` with soxr (its
    very-high-quality setting); output length round(N * new / orig).

    Accuracy, measured on unit sines against the sine evaluated at the new rate (rates 8k..48k):
    error < 1e-4 up to 0.8 x the lower Nyquist frequency (< 1e-6 up to 0.5 x), except within
    ~100 lower-rate samples of either end, where the signal is taken as zero beyond the ends;
    tones above the output Nyquist frequency and images when upsampling come out > 80 dB down.
    """
    orig_rate, new_rate = int(orig_rate), int(new_rate)
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
    if orig_rate == new_rate:
        return wav
    x = wav.detach().cpu().reshape(-1, wav.shape[-1]).T.numpy()  # soxr wants [N, channels]
    y = soxr.resample(np.ascontiguousarray(x), orig_rate, new_rate, quality="VHQ")
    return torch.from_numpy(np.ascontiguousarray(y.T)).reshape(*wav.shape[:-1], -1).to(wav.device)


def _as_mono(samples, allow_empty: bool = False) -> torch.Tensor:
    """float32 CPU tensor [N] from samples [N], [1, N] or [N, 1]; refuses anything else, empty or non-finite."""
    wav = torch.from_numpy(np.asarray(samples)) if isinstance(samples, np.ndarray) else samples
    if not isinstance(wav, torch.Tensor):
        raise ValueError(f"expected audio samples as a torch tensor or numpy array, got {type(samples).__name__}")
    if not wav.is_floating_point():
        raise ValueError(f"expected float samples in [-1, 1], got {wav.dtype} (scale integer PCM to floats first)")
    if wav.ndim == 2 and 1 in wav.shape:
        wav = wav.reshape(-1)
    if wav.ndim != 1:
        raise ValueError(f"expected mono audio [N] or [1, N], got shape {tuple(wav.shape)}; mix down to mono first (e.g. average the channels)")
    if wav.numel() == 0 and not allow_empty:
        raise ValueError("audio is empty")
    if not torch.isfinite(wav).all():
        raise ValueError("audio contains NaN or Inf samples")
    return wav.detach().to("cpu", torch.float32)
