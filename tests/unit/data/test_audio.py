"""The one resampler (pipeline.data.audio.resample): both kernels agree, kinds and lengths are kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio

from pipeline.data.audio import resample, to_mono_resampled


def _tone(sr: int, seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.mark.parametrize("cache_kernel", [False, True])
def test_numpy_in_numpy_out_at_the_new_length(cache_kernel):
    out = resample(_tone(16000), 16000, 8000, cache_kernel=cache_kernel)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.flags.c_contiguous
    assert out.shape == (4000,)


def test_tensor_in_tensor_out_equals_torchaudio_functional():
    wave = torch.from_numpy(_tone(22050))
    out = resample(wave, 22050, 8000)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, torchaudio.functional.resample(wave, 22050, 8000), rtol=0, atol=0)


def test_cached_kernel_equals_the_transform_and_nearly_the_functional():
    wave = _tone(22050)
    cached = resample(wave, 22050, 8000, cache_kernel=True)
    expected = torchaudio.transforms.Resample(22050, 8000)(torch.from_numpy(wave)).numpy()
    np.testing.assert_array_equal(cached, expected)
    np.testing.assert_allclose(cached, resample(wave, 22050, 8000), atol=1e-5)


def test_same_rate_or_no_samples_is_returned_as_float32():
    wave = np.linspace(-1, 1, 100)  # float64
    same = resample(wave, 8000, 8000)
    assert same.dtype == np.float32 and np.array_equal(same, wave.astype(np.float32))
    assert resample(np.zeros(0, dtype=np.float32), 16000, 8000).shape == (0,)


def test_to_mono_resampled_downmixes_then_resamples():
    stereo = np.stack([_tone(16000), np.zeros(8000, dtype=np.float32)])
    mono = to_mono_resampled(stereo, 16000, 8000)
    torch.testing.assert_close(mono, resample(torch.from_numpy(_tone(16000) / 2), 16000, 8000))
