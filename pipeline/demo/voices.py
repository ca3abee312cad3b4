"""The eSpeak NG voices of the demo corpus: English accents, variant families, and the ones
held out for the golden set.

A voice is an accent and a variant, ``{accent}+{variant}`` (``en-us+f3``, ``en-gb-x-rp+klatt4``),
as the bundled ``espeakng-loader`` data names them. Its speaker id in a manifest is
``espeak-{voice}`` and its group ``synthetic/{accent}``. Each synthetic utterance draws its
own speaking rate, pitch, pitch range and word gap (:func:`draw_settings`).

Accents and variant families arrive in the drops week by week (:data:`ACCENT_ARRIVAL`,
:data:`FAMILY_ARRIVAL`); the accent(s) in :data:`HELD_OUT_ACCENTS` and the variants in
:data:`HELD_OUT_VARIANTS` never do: they speak only in the golden set. The
:data:`REGULAR_VOICES` (the golden sets' seen voices among them) speak
:data:`REGULAR_SHARE` of every drop's synthetic utterances once they have arrived, so a
"seen" golden voice is really heard in training; the rest draw from the whole pool. Drops
use even speaking rates and the golden set odd ones, so no synthetic utterance repeats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Accent -> the first week whose drops use it. The bundled data also has en-shaw (Shavian script:
# Latin text is read as en), left out.
ACCENT_ARRIVAL: dict[str, int] = {
    "en": 1,
    "en-us": 1,
    "en-gb-x-rp": 1,
    "en-029": 2,
    "en-gb-x-gbclan": 3,
    "en-gb-x-gbcwmd": 4,
    "en-us-nyc": 5,
}
DROP_ACCENTS: tuple[str, ...] = tuple(ACCENT_ARRIVAL)
HELD_OUT_ACCENTS: tuple[str, ...] = ("en-gb-scotland",)  # golden v1's held-out voice is Scottish too

# Variant families of the bundled data (voices/!v). The robot, whisper, croak and novelty variants are left out.
VARIANT_FAMILIES: dict[str, tuple[str, ...]] = {
    "male": ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8"),
    "female": ("f1", "f2", "f3", "f4", "f5"),
    "klatt": ("klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6"),
    "named": (
        "adam", "Alex", "Alicia", "Andy", "Annie", "aunty", "benjamin", "boris", "caleb", "david", "edward",
        "Gene", "grandma", "grandpa", "ian", "john", "Lee", "linda", "max", "michel", "norbert", "paul",
        "quincy", "robert", "shelby", "steph", "travis", "victor", "zac",
    ),
}
FAMILY_ARRIVAL: dict[str, int] = {"male": 1, "female": 1, "klatt": 2, "named": 3}
HELD_OUT_VARIANTS: tuple[str, ...] = ("Annie", "michel")
# Voices that recur in the drops (golden v1's seen voices, then golden v2's).
REGULAR_VOICES: tuple[str, ...] = (
    "en+m1", "en+f3", "en-us+m3",
    "en+m3", "en+f2", "en+klatt3", "en-us+m5", "en-us+f4", "en-gb-x-rp+m7", "en-gb-x-rp+f1", "en-029+m1",
)
REGULAR_SHARE = 0.4

SYNTHETIC_PREFIX = "synthetic"
VOLUME = 75  # eSpeak amplitude (0..200); at 100 a few variants clip

_RATES = (120, 240)  # words per minute
_PITCHES = (10, 90)  # eSpeak base pitch, 0..100
_PITCH_RANGES = (20, 90)  # eSpeak pitch range (intonation), 0..100
_WORD_GAPS = (0, 12)  # extra pause between words, in 10 ms units
_COMMA_SHARE = 0.3  # "four, one" makes eSpeak pause at the comma


@dataclass(frozen=True)
class VoiceSettings:
    """How one synthetic utterance is spoken."""

    voice: str
    rate: int
    pitch: int
    pitch_range: int
    word_gap: int
    commas: bool
    volume: int = VOLUME

    @property
    def source(self) -> str:
        return (
            f"espeak:{self.voice}:rate={self.rate}:pitch={self.pitch}:range={self.pitch_range}"
            f":gap={self.word_gap}"
        )

    @property
    def source_v1(self) -> str:
        """Golden v1's shorter form (its utterances kept eSpeak's default range and word gap)."""
        return f"espeak:{self.voice}:rate={self.rate}:pitch={self.pitch}"


def voice_name(accent: str, variant: str) -> str:
    return f"{accent}+{variant}"


def accent_of(voice: str) -> str:
    return voice.split("+", 1)[0]


def variant_of(voice: str) -> str:
    return voice.split("+", 1)[1] if "+" in voice else ""


def speaker_of(voice: str) -> str:
    """The manifest speaker id of a voice: ``espeak-en-us+f3``."""
    return f"espeak-{voice}"


def group_of(voice: str) -> str:
    """The manifest group of a voice: ``synthetic/{accent}``."""
    return f"{SYNTHETIC_PREFIX}/{accent_of(voice)}"


def is_held_out(voice: str) -> bool:
    return accent_of(voice) in HELD_OUT_ACCENTS or variant_of(voice) in HELD_OUT_VARIANTS


def drop_accents(week: int) -> tuple[str, ...]:
    """The accents week ``week``'s drop speaks, in arrival order."""
    return tuple(a for a, first in ACCENT_ARRIVAL.items() if first <= week)


def drop_variants(week: int) -> tuple[str, ...]:
    """The variants week ``week``'s drop speaks (held-out ones never)."""
    return tuple(
        v
        for family, first in FAMILY_ARRIVAL.items()
        if first <= week
        for v in VARIANT_FAMILIES[family]
        if v not in HELD_OUT_VARIANTS
    )


def draw_settings(rng: np.random.Generator, voice: str, *, odd_rate: bool) -> VoiceSettings:
    """Rate (odd for the golden set, even for drops), pitch, pitch range, word gap and commas."""
    rate = int(rng.integers(_RATES[0] // 2, _RATES[1] // 2)) * 2 + (1 if odd_rate else 0)
    return VoiceSettings(
        voice=voice,
        rate=rate,
        pitch=int(rng.integers(_PITCHES[0], _PITCHES[1] + 1)),
        pitch_range=int(rng.integers(_PITCH_RANGES[0], _PITCH_RANGES[1] + 1)),
        word_gap=int(rng.integers(_WORD_GAPS[0], _WORD_GAPS[1] + 1)),
        commas=bool(rng.random() < _COMMA_SHARE),
    )
