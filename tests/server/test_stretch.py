"""`speed`: the streaming time stretch (no model).  A pure tone tells what a stretch must keep:
its pitch (a resample would move it), its smoothness (a click at a chunk seam is a jump far
steeper than the tone's own slope) and where it ends (at n / speed)."""
import numpy as np
import pytest
import torch

from misotts.server.stretch import FRAME, Stretcher

SR = 24_000
CHUNK = 7680  # the server's chunk: 4 frames of 80 ms


def tone(seconds: float, hz: float = 200.0, amp: float = 0.5) -> torch.Tensor:
    return torch.from_numpy(amp * np.sin(2 * np.pi * hz * np.arange(int(seconds * SR)) / SR)).float()


def stretched(x: torch.Tensor, speed: float, chunk: int = CHUNK) -> tuple[np.ndarray, list[int]]:
    """The stretched signal, fed chunk by chunk, and where each output chunk began."""
    st, outs = Stretcher(speed), []
    for piece in torch.split(x, chunk):
        outs.append(st.add(piece))
    outs.append(st.finish())
    seams = np.cumsum([len(o) for o in outs])[:-1].tolist()
    return torch.cat(outs).numpy(), seams


@pytest.mark.parametrize("speed", [0.25, 0.5, 0.8, 1.1, 1.5, 2.0, 4.0])
def test_the_stretch_keeps_the_pitch_and_ends_at_n_over_speed(speed):
    x = tone(3.0)
    y, _ = stretched(x, speed)
    assert len(y) == round(len(x) / speed)  # exact, whatever the chunking
    # the tone's last loud sample is where the input's end lands, within one WSOLA frame (1,024
    # samples, 43 ms): WSOLA moves each frame by up to that much to line its waveform up
    last = np.nonzero(np.abs(y) > 0.1)[0][-1]
    assert abs(last + 1 - len(x) / speed) <= FRAME, (last, len(x) / speed)
    # the pitch stays 200 Hz (a resample would give 200 * speed); the FFT's bin is 1 / duration Hz
    body = y[: int(0.9 * len(x) / speed)]
    peak_hz = np.argmax(np.abs(np.fft.rfft(body * np.hanning(len(body))))) * SR / len(body)
    assert abs(peak_hz - 200.0) <= 2 * SR / len(body) + 0.5, peak_hz


@pytest.mark.parametrize("speed", [0.5, 1.3, 3.0])
def test_no_click_at_the_chunk_seams(speed):
    x = tone(2.0)
    y, seams = stretched(x, speed, chunk=1920)  # the first chunk size: 80 ms, many seams
    slope = 2 * np.pi * 200 / SR * 0.5  # the tone's steepest step between two samples
    steps = np.abs(np.diff(y[: int(0.98 * len(x) / speed)]))
    assert steps.max() <= 1.02 * slope, steps.max() / slope  # nowhere, seams included, a jump
    # and the level holds across every seam (no dip from a mis-overlapped frame): the envelope
    # in a 5 ms window around each seam is the tone's amplitude
    for s in seams:
        if 200 < s < 0.98 * len(x) / speed - 200:
            assert np.abs(y[s - 120:s + 120]).max() == pytest.approx(0.5, abs=0.02)


def test_a_speech_like_signal_stretched_in_chunks_has_no_seam_spikes():
    """A harmonic voice with a gliding pitch and syllable-rate loudness: the sample-to-sample steps
    near seams are no larger than those elsewhere."""
    t = np.arange(2 * SR) / SR
    phase = 2 * np.pi * np.cumsum(140 + 20 * t) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 10)) * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)) * 0.2
    y, seams = stretched(torch.from_numpy(x).float(), 1.5, chunk=1920)
    steps = np.abs(np.diff(y))
    near = np.zeros(len(steps), bool)
    for s in seams:
        near[max(s - 8, 0):s + 8] = True
    assert steps[near].max() <= steps[~near].max()


def test_speed_out_of_range_is_refused():
    with pytest.raises(ValueError):
        Stretcher(4.5)
