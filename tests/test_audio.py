"""lamina.data.audio: WAV reading, mel scales and filterbank, log-mel spectrograms.

Hand-computed values always; parity with librosa (filters.mel, feature.melspectrogram + power_to_db) when it is
installed (it is a test-only dependency).
"""

from __future__ import annotations

import math
import wave

import numpy as np
import pytest
import torch

from lamina.data.audio import (LogMel, hz_to_mel, log_mel_batch, mel_filterbank, mel_to_hz, power_spectrogram,
                               power_to_db, read_wav)
from lamina.errors import DataError

from conftest import SHARED_DATA, needs_shared


def write_wav(path, frames: np.ndarray, rate: int = 8000, width: int = 2, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames.tobytes())


# --------------------------------------------------------------------------------------------- WAV


def test_read_wav_16_bit_values_and_stereo_mixdown(tmp_path):
    write_wav(tmp_path / "a.wav", np.array([0, 16384, -16384, -32768, 32767], "<i2"))
    x, sr = read_wav(tmp_path / "a.wav")
    assert sr == 8000 and x.dtype == np.float32
    np.testing.assert_allclose(x, [0.0, 0.5, -0.5, -1.0, 32767 / 32768])
    # stereo frames (L, R) interleaved: (16384, 0) -> 0.25, (-32768, -32768) -> -1
    write_wav(tmp_path / "s.wav", np.array([16384, 0, -32768, -32768], "<i2"), channels=2)
    np.testing.assert_allclose(read_wav(tmp_path / "s.wav")[0], [0.25, -1.0])


def test_read_wav_8_24_32_bit(tmp_path):
    write_wav(tmp_path / "u8.wav", np.array([128, 192, 0], np.uint8), width=1)  # unsigned, 128 = silence
    np.testing.assert_allclose(read_wav(tmp_path / "u8.wav")[0], [0.0, 0.5, -1.0])
    # 24-bit little endian: 0x400000 = 2^22 -> 0.5; 0xC00000 = -2^22 -> -0.5
    raw = np.array([0x00, 0x00, 0x40, 0x00, 0x00, 0xC0], np.uint8)
    write_wav(tmp_path / "i24.wav", raw, width=3)
    np.testing.assert_allclose(read_wav(tmp_path / "i24.wav")[0], [0.5, -0.5])
    write_wav(tmp_path / "i32.wav", np.array([2 ** 30, -(2 ** 31)], "<i4"), width=4)
    np.testing.assert_allclose(read_wav(tmp_path / "i32.wav")[0], [0.5, -1.0])


def test_read_wav_resamples_keeping_the_frequency(tmp_path):
    t = np.arange(16000) / 16000.0
    write_wav(tmp_path / "tone.wav", (np.sin(2 * np.pi * 1000 * t) * 20000).astype("<i2"), rate=16000)
    x, sr = read_wav(tmp_path / "tone.wav", sample_rate=8000)
    assert sr == 8000 and len(x) == 8000
    spec = np.abs(np.fft.rfft(x))
    assert np.argmax(spec) == 1000  # 1 Hz per bin over one second


def test_read_wav_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing.wav: WAV file not found$"):
        read_wav(tmp_path / "missing.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF....not a wave at all")
    with pytest.raises(DataError, match=r"bad.wav: not a PCM WAV file"):
        read_wav(tmp_path / "bad.wav")


# ----------------------------------------------------------------------------------------- mel scale


def test_mel_scales_hand_values():
    # Slaney: linear 3/200 mel per Hz up to 1 kHz (= 15 mel), then 27 mels per factor 6.4
    np.testing.assert_allclose(hz_to_mel([0.0, 500.0, 1000.0, 6400.0]), [0.0, 7.5, 15.0, 42.0])
    # HTK: 2595 log10(1 + f / 700); 700 Hz -> 2595 log10(2)
    np.testing.assert_allclose(hz_to_mel([0.0, 700.0], htk=True), [0.0, 2595 * math.log10(2)])
    f = np.array([0.0, 123.0, 999.0, 1000.0, 1001.0, 3999.0, 11025.0])
    for htk in (False, True):
        np.testing.assert_allclose(mel_to_hz(hz_to_mel(f, htk), htk), f, rtol=1e-12, atol=1e-9)


def test_mel_filterbank_hand_computed_single_triangle():
    # sr 8 kHz, n_fft 8: bins at 0, 1, 2, 3, 4 kHz. One HTK filter from 0 to 4 kHz peaking at the mel midpoint.
    fc = 700.0 * (10 ** ((2595 * math.log10(1 + 4000 / 700) / 2) / 2595) - 1)  # ~1.564 kHz
    bins = [0.0, 1000.0, 2000.0, 3000.0, 4000.0]
    want = [f / fc if f <= fc else (4000.0 - f) / (4000.0 - fc) for f in bins]
    fb = mel_filterbank(8000, 8, n_mels=1, htk=True, norm=None)
    assert fb.shape == (1, 5)
    np.testing.assert_allclose(fb[0].numpy(), want, rtol=1e-6, atol=1e-7)
    # Slaney norm: scaled by 2 / (upper edge - lower edge) = 2 / 4000
    np.testing.assert_allclose(mel_filterbank(8000, 8, 1, htk=True)[0].numpy(), np.array(want) * 2 / 4000, rtol=1e-6)


def test_slaney_norm_gives_unit_area_filters():
    fb = mel_filterbank(16000, 16384, n_mels=20, fmin=100.0).double()
    bin_hz = 16000 / 16384
    np.testing.assert_allclose((fb.sum(1) * bin_hz).numpy(), 1.0, rtol=2e-3)


def test_mel_filterbank_rejects_bad_ranges():
    with pytest.raises(DataError, match=r"fmax <= sample_rate / 2 = 4000.0"):
        mel_filterbank(8000, 256, 40, fmax=5000)
    with pytest.raises(DataError, match="norm must be 'slaney' or None"):
        mel_filterbank(8000, 256, 40, norm="l2")


# ------------------------------------------------------------------------------------- spectrograms


def test_power_spectrogram_frames_and_tone_bin():
    sr, n_fft, hop = 8000, 256, 128
    t = torch.arange(2000) / sr
    x = torch.sin(2 * math.pi * 1000.0 * t)  # 1 kHz = bin 1000 / (8000 / 256) = 32
    p = power_spectrogram(x, n_fft, hop)
    assert p.shape == (129, 1 + 2000 // hop)
    assert int(p[:, 5].argmax()) == 32
    # Hann window, a full cosine period of amplitude 1 at an exact bin: |X_k| = sum(w) / 2 = n_fft / 4
    torch.testing.assert_close(p[32, 5], torch.tensor((n_fft / 4) ** 2), rtol=1e-3, atol=0.0)


def test_power_to_db_hand_values():
    s = torch.tensor([[[1.0, 10.0], [1e-12, 1e6]]])
    torch.testing.assert_close(power_to_db(s, top_db=None), torch.tensor([[[0.0, 10.0], [-100.0, 60.0]]]))
    torch.testing.assert_close(power_to_db(s, top_db=80.0), torch.tensor([[[0.0, 10.0], [-20.0, 60.0]]]))


def test_log_mel_batch_equals_one_recording_at_a_time():
    g = torch.Generator().manual_seed(0)
    waves = [torch.randn(n, generator=g).numpy() * 0.1 for n in (1000, 2500, 300, 4000)]
    lm = LogMel()
    frames, lens = log_mel_batch(waves, lm, chunk=3)
    assert lens.tolist() == [1 + n // 128 for n in (1000, 2500, 300, 4000)]
    for i, w in enumerate(waves):
        alone = lm(torch.from_numpy(w))  # (T, 40)
        torch.testing.assert_close(frames[i, :lens[i]], alone, rtol=1e-4, atol=1e-3)
        assert (frames[i, lens[i]:] == 0).all()
    capped, clens = log_mel_batch(waves, lm, max_frames=10)
    assert capped.shape == (4, 10, 40) and clens.tolist() == [8, 10, 3, 10]
    torch.testing.assert_close(capped[3], frames[3, :10])


def _librosa():
    return pytest.importorskip("librosa", reason="librosa not installed (test-only parity dependency)")


@pytest.mark.parametrize("sr, n_fft, n_mels, fmin, fmax, htk, norm", [
    (8000, 256, 40, 0.0, None, False, "slaney"), (16000, 512, 64, 20.0, 7600.0, False, "slaney"),
    (22050, 2048, 128, 0.0, None, True, None), (8000, 200, 23, 50.0, 3500.0, True, "slaney"),
])
def test_mel_filterbank_matches_librosa(sr, n_fft, n_mels, fmin, fmax, htk, norm):
    lr = _librosa()
    ours = mel_filterbank(sr, n_fft, n_mels, fmin, fmax, htk, norm).numpy()
    ref = lr.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk, norm=norm)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-8)


def _ref_log_mel(lr, y, sr):
    S = lr.feature.melspectrogram(y=y, sr=sr, n_fft=256, hop_length=128, n_mels=40, power=2.0, center=True,
                                  pad_mode="constant")
    return lr.power_to_db(S, ref=1.0, amin=1e-10, top_db=80.0).T  # (T, 40)


def test_log_mel_matches_librosa_on_a_chirp():
    lr = _librosa()
    sr = 8000
    t = np.arange(6000) / sr
    y = (0.5 * np.sin(2 * np.pi * (200 * t + 1500 * t ** 2))).astype(np.float32)  # 200 Hz -> 3.2 kHz
    ours = LogMel(sr)(torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(ours, _ref_log_mel(lr, y, sr), atol=2e-3)


@needs_shared("fsdd/recordings")
def test_log_mel_matches_librosa_on_fsdd():
    lr = _librosa()
    path = SHARED_DATA / "fsdd" / "recordings" / "7_jackson_12.wav"
    y, sr = read_wav(path)
    y_ref, _ = lr.load(str(path), sr=None)
    np.testing.assert_allclose(y, y_ref, atol=1e-7)
    frames, lens = log_mel_batch([y], LogMel(sr))
    np.testing.assert_allclose(frames[0, :lens[0]].numpy(), _ref_log_mel(lr, y, sr), atol=2e-3)
