"""The robust front end (issue #15): level-free, finite on digital silence, per utterance in a batch."""

from __future__ import annotations

import glob

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.asr.frontend import LogMel, frontend_settings
from pipeline.config import FeatureConfig, project_path

FSDD = project_path("../shared/data/fsdd/recordings")


def _speech() -> list[torch.Tensor]:
    files = sorted(glob.glob(str(FSDD / "*_jackson_1*.wav")))[:6]
    if not files:
        pytest.skip(f"FSDD recordings not found under {FSDD}")
    return [torch.from_numpy(sf.read(f, dtype="float32")[0]) for f in files]


def _frontend(**overrides) -> LogMel:
    return LogMel(frontend_settings(FeatureConfig(**overrides), 8000))


@pytest.mark.parametrize("normalize", ["utterance", "sliding", "global"])
def test_an_utterance_30_db_quieter_gives_the_same_features(normalize):
    fe = _frontend(normalize=normalize)
    for wave in _speech():
        loud, quiet = fe(wave), fe(wave * 10 ** (-30 / 20))
        assert float((loud - quiet).abs().max()) < 1e-2, "level changed the features"


def test_without_level_normalization_the_level_shows():
    fe = _frontend(level="none", dither_db=None, normalize="global")
    wave = _speech()[0]
    assert float((fe(wave) - fe(wave * 10 ** (-30 / 20))).abs().mean()) > 1.0  # the test above can fail


@pytest.mark.parametrize("dither_db", [-60.0, None])
def test_digital_silence_gives_finite_features(dither_db):
    fe = _frontend(dither_db=dither_db)
    wave = _speech()[0]
    gap = torch.cat([wave, torch.zeros(4000), wave])
    for x in (gap, torch.zeros(8000)):
        feats = fe(x)
        assert torch.isfinite(feats).all()
    if dither_db is not None:  # dither: silence frames are noise-like, not one constant floor value
        silence = fe(torch.zeros(8000))
        assert float(silence.std()) > 0.1


def test_a_padded_batch_gives_each_utterance_its_own_features():
    fe = _frontend(normalize="utterance")
    waves = _speech()[:3]
    n = max(len(w) for w in waves)
    batch = torch.zeros(len(waves), n)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = w
    out = fe(batch, torch.tensor([len(w) for w in waves]))
    for i, w in enumerate(waves):
        alone = fe(w)
        frames = alone.size(0)
        # the last frames see zero padding instead of the reflection (and shift the mean a little)
        np.testing.assert_allclose(out[i, 2 : frames - 2].numpy(), alone[2 : frames - 2].numpy(), atol=6e-2)


def test_the_front_end_scripts_with_its_settings():
    for normalize in ("utterance", "sliding", "global"):
        scripted = torch.jit.script(_frontend(normalize=normalize))
        assert scripted(torch.randn(2, 4000), torch.tensor([4000, 3000])).shape == (2, 51, 40)
