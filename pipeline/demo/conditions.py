"""Recording conditions of the demo corpus: the level, the silence between words, a DC offset.

Real recordings arrive at any level (quiet ones peak at -26 dBFS and lower), with digital
silence (exact zeros) or a noise floor between words, and now and then with a DC offset.
Every utterance of a drop and of golden v2 gets one condition (its manifest field
``condition``):

==================  =====================  ===================================  ==========
condition           peak level             between words                        where
==================  =====================  ===================================  ==========
``noise_floor``     -24 .. -1 dBFS         noise floor, -70 .. -50 dBFS RMS     drops, golden
``digital_silence`` -24 .. -1 dBFS         exact zeros (a noise gate)           drops, golden
``dc_offset``       -20 .. -1 dBFS         noise floor, plus a DC offset of     drops, golden
                                           0.5 .. 2.5 % of full scale
``quiet``           -35 .. -26 dBFS        exact zeros (a noise gate)           golden only
==================  =====================  ===================================  ==========

The peak level is the speech's, before the noise floor and DC offset are added (with the
offset, a dc_offset recording still peaks at -22.5 dBFS or above). ``quiet`` is reserved for
the golden set (:data:`GOLDEN_ONLY`): no drop peaks below -25 dBFS, so the golden set
measures a level the training data never had.
:func:`apply_condition` turns a padded utterance (speech with zeros between words and at
its ends) into its recorded sound; every random choice comes from the caller's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Condition:
    """How one kind of recording sounds."""

    name: str
    peak_dbfs: tuple[float, float]
    digital_silence: bool
    dc_offset: bool = False


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition("noise_floor", (-24.0, -1.0), digital_silence=False),
        Condition("digital_silence", (-24.0, -1.0), digital_silence=True),
        Condition("dc_offset", (-20.0, -1.0), digital_silence=False, dc_offset=True),  # offset included: >= -22.5
        Condition("quiet", (-35.0, -26.0), digital_silence=True),
    )
}
GOLDEN_ONLY: tuple[str, ...] = ("quiet",)
# A drop's mix (shares sum to 1); golden v2 gives each of CONDITIONS an equal share per speaker.
DROP_SHARES: dict[str, float] = {"noise_floor": 0.45, "digital_silence": 0.45, "dc_offset": 0.10}

_NOISE_DBFS = (-70.0, -50.0)
_DC_OFFSET = (0.005, 0.025)
_GATE_FRAME_S = 0.010
_GATE_BELOW_DB = 40.0  # a frame more than this below the loudest frame is silence
_GATE_MIN_FRAMES = 3  # only runs of >= 30 ms are gated, so short closures inside words stay


def draw_drop_condition(rng: np.random.Generator) -> str:
    names = list(DROP_SHARES)
    return names[int(rng.choice(len(names), p=[DROP_SHARES[n] for n in names]))]


def noise_gate(x: np.ndarray, sample_rate: int) -> np.ndarray:
    """``x`` with every run of >= 30 ms more than 40 dB below its loudest 10 ms frame set to exact zeros."""
    frame = max(1, int(_GATE_FRAME_S * sample_rate))
    n = x.size // frame
    if n == 0:
        return x
    rms = np.sqrt(np.mean(np.square(x[: n * frame].reshape(n, frame)), axis=1))
    quiet = rms < float(rms.max()) * 10.0 ** (-_GATE_BELOW_DB / 20.0)
    out = x.copy()
    start = None
    for i, q in enumerate(np.append(quiet, False)):
        if q and start is None:
            start = i
        elif not q and start is not None:
            if i - start >= _GATE_MIN_FRAMES:
                end = x.size if i == n else i * frame
                out[start * frame : end] = 0.0
            start = None
    return out


def apply_condition(padded: np.ndarray, sample_rate: int, condition: str, rng: np.random.Generator) -> np.ndarray:
    """The recorded sound of ``padded`` (float64 samples) under ``condition``, in [-1, 1)."""
    cond = CONDITIONS[condition]
    x = padded.astype(np.float64)
    if cond.digital_silence:
        x = noise_gate(x, sample_rate)
    peak = float(np.abs(x).max())
    if peak > 0:
        x *= 10.0 ** (rng.uniform(*cond.peak_dbfs) / 20.0) / peak
    if not cond.digital_silence:
        x += rng.normal(0.0, 10.0 ** (rng.uniform(*_NOISE_DBFS) / 20.0), size=x.size)
    if cond.dc_offset:
        x += rng.choice((-1.0, 1.0)) * rng.uniform(*_DC_OFFSET)
    return x
