"""The demo corpus: weekly incoming drops and a versioned golden set of spoken digit sequences.

Utterances are digit sequences ("four one five") of ``demo.min_digits..demo.max_digits``
digits, either concatenated from real recordings of the Free Spoken Digit Dataset (FSDD:
one speaker per utterance, short pauses between digits) or spoken by eSpeak NG
(:mod:`pipeline.demo.tts`) in many voices (:mod:`pipeline.demo.voices`: accents x variants,
with their own rate, pitch, pitch range and word gap), each under a recording condition
(:mod:`pipeline.demo.conditions`). Who speaks when in the drops, and the leakage rules, are
:mod:`pipeline.demo.schedule`; the golden versions are :mod:`pipeline.demo.golden`; how an
utterance sounds is :mod:`pipeline.demo.recordings`.

On-store layout (keys relative to the store root)::

    incoming/{drop_id}/manifest.jsonl     one weekly drop (drop_id = week-001, week-002, ...)
    incoming/{drop_id}/audio/{utt_id}.wav   its audio (a few .flac, 16 kHz or stereo files)
    golden/{version}/manifest.jsonl       the golden set, records carry "seen": true/false
    golden/{version}/audio/{utt_id}.wav
    golden/{version}/meta.json            composition, held-out speakers/voices, attribution

Manifest lines are NeMo-compatible JSON (keys sorted): ``audio_filepath`` (relative to the
manifest's folder), ``duration`` (seconds, 3 decimals), ``text`` (normalized digit words),
``speaker``, ``group`` (FSDD accent such as ``USA/neutral``, or ``synthetic/{accent}``;
``synthetic`` in golden v1), ``utt_id``, ``sha256`` (of the audio file's bytes), plus
``source`` (the FSDD recordings or the eSpeak voice settings that made it), ``condition``
(the recording condition; not in golden v1) and, in the golden set only, ``seen``. With
``defects_per_drop > 0`` each drop's manifest ends with records ingestion must quarantine
(utt_id ``defect-{kind}-...``, kinds in :data:`DEFECT_KINDS`).

Output is byte-identical for the same seed and sizes: every drop and the golden set draw
from their own seeded generator, eSpeak runs in a fresh process per drop (its waveform
generator keeps state between calls), and WAV/FLAC/JSON are written deterministically.
A drop's audio is written before its manifest, which marks the drop complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.config import DemoConfig
from pipeline.data.text import DIGIT_WORDS
from pipeline.demo.golden import GOLDEN_SPEAKERS, default_size, golden_meta, plan_golden
from pipeline.demo.recordings import (
    CorpusError,
    Encoded,
    FsddRecordings,
    encode,
    render_fsdd,
    render_speech,
    single_threaded_torch,
)
from pipeline.demo.schedule import UtterancePlan, WeekPlan, drop_rng, plan_drop, plan_week
from pipeline.demo.tts import SpeechRequest, synthesize_isolated
from pipeline.storage import ObjectStore, join

__all__ = ["DEFECT_KINDS", "build_demo_corpus"]

DEFECT_KINDS: tuple[str, ...] = (
    "corrupt_audio",
    "empty_text",
    "missing_audio",
    "not_json",
    "path_escape",
    "silent_audio",
    "duration_mismatch",
    "duplicate_audio",
)


@dataclass
class _SetOutput:
    """The files and manifest lines of one drop or of the golden set."""

    prefix: str
    files: list[tuple[str, bytes]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    conditions: Counter = field(default_factory=Counter)
    defects: Counter = field(default_factory=Counter)
    seconds: float = 0.0


def _speech_requests(plans: Sequence[UtterancePlan]) -> list[SpeechRequest]:
    """eSpeak requests for the synthetic utterances; commas sometimes make eSpeak pause."""
    requests = []
    for u in plans:
        v = u.voice
        if v is None:
            continue
        words = (", " if v.commas else " ").join(DIGIT_WORDS[d] for d in u.digits)
        requests.append(SpeechRequest(
            text=words, voice=v.voice, rate=v.rate, pitch=v.pitch, seed=u.render_seed,
            pitch_range=v.pitch_range, word_gap=v.word_gap, volume=v.volume,
        ))
    return requests


def _submit_speech(executor: ThreadPoolExecutor, plans: Sequence[UtterancePlan]) -> Future | None:
    """Start eSpeak for the synthetic utterances of one set, in a fresh process of its own."""
    requests = _speech_requests(plans)
    return executor.submit(synthesize_isolated, requests) if requests else None


def _manifest_line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n"


def _add_utterance(out: _SetOutput, u: UtterancePlan, enc: Encoded) -> None:
    rel = f"audio/{u.utt_id}.{enc.ext}"
    record: dict[str, Any] = {
        "audio_filepath": rel,
        "duration": enc.duration,
        "group": u.group,
        "sha256": enc.sha256,
        "source": u.source,
        "speaker": u.speaker,
        "text": u.text,
        "utt_id": u.utt_id,
    }
    if u.seen is not None:
        record["seen"] = u.seen
    if u.condition is not None:
        record["condition"] = u.condition
        out.conditions[u.condition] += 1
    out.files.append((join(out.prefix, rel), enc.data))
    out.lines.append(_manifest_line(record))
    out.records.append(record)
    out.formats[u.audio_format] += 1
    out.seconds += enc.frames / enc.sample_rate


def _render_set(
    plans: Sequence[UtterancePlan], speech: Future | None, fsdd: FsddRecordings, sample_rate: int, prefix: str, bar: tqdm
) -> _SetOutput:
    out = _SetOutput(prefix=prefix)
    synthesized: list[np.ndarray] = []
    tts_rate = 0
    if speech is not None:
        synthesized, tts_rate = speech.result()
    k = 0
    for u in plans:
        if u.voice is None:
            wave = render_fsdd(fsdd, u.speaker, u.digits, u.takes, u.render_seed, sample_rate, u.condition)
        else:
            wave = render_speech(synthesized[k], tts_rate, u.render_seed, sample_rate, u.condition)
            k += 1
        _add_utterance(out, u, encode(wave, sample_rate, u.audio_format))
        bar.update(1)
    return out


def _salt_defects(
    out: _SetOutput, drop_id: str, count: int, base: Sequence[UtterancePlan], fsdd: FsddRecordings,
    sample_rate: int, rng: np.random.Generator,
) -> None:
    """Append ``count`` records that ingestion must quarantine, cycling through :data:`DEFECT_KINDS`."""
    fsdd_plans = [u for u in base if u.voice is None] or list(base)
    for j in range(count):
        kind = DEFECT_KINDS[j % len(DEFECT_KINDS)]
        utt_id = f"defect-{kind}-{drop_id}-{j:03d}"
        template = fsdd_plans[int(rng.integers(len(fsdd_plans)))]
        if template.voice is None:
            wave = render_fsdd(
                fsdd, template.speaker, template.digits, template.takes, template.render_seed, sample_rate,
                template.condition,
            )
        else:  # a drop without FSDD utterances: a silent-ish stand-in is enough for a defect
            wave = rng.normal(0.0, 0.1, size=sample_rate)
        enc = encode(wave + rng.normal(0.0, 1e-3, size=wave.size), sample_rate, "wav")
        rel = f"audio/{utt_id}.wav"
        record: dict[str, Any] = {
            "audio_filepath": rel, "duration": enc.duration, "group": template.group, "sha256": enc.sha256,
            "source": ["defect"], "speaker": template.speaker, "text": template.text, "utt_id": utt_id,
        }
        data: bytes | None = enc.data
        if kind == "corrupt_audio":
            data = b"RIFF" + rng.bytes(2044)
            record["sha256"] = hashlib.sha256(data).hexdigest()
        elif kind == "empty_text":
            record["text"] = ""
        elif kind == "missing_audio":
            data = None
        elif kind == "not_json":
            out.lines.append(f'{{"audio_filepath": "{rel}", "text": "{template.text}", "utt_id": "{utt_id}"\n')
            out.defects[kind] += 1
            continue
        elif kind == "path_escape":
            record["audio_filepath"] = f"../{utt_id}.wav"
            data = None
        elif kind == "silent_audio":
            frames = int(rng.integers(sample_rate // 2, 2 * sample_rate))
            enc = encode(np.zeros(frames), sample_rate, "wav")
            data = enc.data
            record.update(duration=enc.duration, sha256=enc.sha256)
        elif kind == "duration_mismatch":
            record["duration"] = round(enc.duration + 2.5, 3)
        elif kind == "duplicate_audio":
            original = out.records[int(rng.integers(len(out.records)))]
            data = dict(out.files)[join(out.prefix, original["audio_filepath"])]
            ext = original["audio_filepath"].rsplit(".", 1)[-1]
            rel = f"audio/{utt_id}.{ext}"
            record.update(
                audio_filepath=rel, duration=original["duration"], sha256=original["sha256"],
                text=original["text"], speaker=original["speaker"], group=original["group"],
            )
        if data is not None:
            out.files.append((join(out.prefix, record["audio_filepath"]), data))
        out.lines.append(_manifest_line(record))
        out.defects[kind] += 1


def _write_set(store: ObjectStore, out: _SetOutput, pool: ThreadPoolExecutor) -> str:
    """Write the audio (in parallel), then the manifest last; return the manifest key."""
    for future in [pool.submit(store.put_bytes, key, data) for key, data in out.files]:
        future.result()
    manifest_key = join(out.prefix, "manifest.jsonl")
    store.put_bytes(manifest_key, "".join(out.lines).encode("utf-8"))
    return manifest_key


def _check_golden_unchanged(store: ObjectStore, prefix: str, manifest: bytes) -> None:
    key = join(prefix, "manifest.jsonl")
    if store.exists(key) and store.get_bytes(key) != manifest:
        raise CorpusError(
            f"golden set {store.uri(key)} already exists with different content (another seed or size?): "
            "a golden version is never rewritten; set demo.golden_version to a new version, "
            f"or delete {store.uri(prefix)} to rebuild it"
        )


def _drop_summary(store: ObjectStore, plan: WeekPlan, out: _SetOutput, manifest_key: str) -> dict[str, Any]:
    speakers = Counter(r["speaker"] for r in out.records)
    return {
        "drop_id": plan.drop_id,
        "prefix": out.prefix + "/",
        "manifest_uri": store.uri(manifest_key),
        "utterances": len(out.records),
        "fsdd_utterances": sum(1 for r in out.records if not r["speaker"].startswith("espeak-")),
        "synthetic_utterances": sum(1 for r in out.records if r["speaker"].startswith("espeak-")),
        "speakers": dict(sorted(speakers.items())),
        "fsdd_speakers": list(plan.speakers),
        "accents": list(plan.accents),
        "voice_variants": len(plan.variants),
        "voices_used": sum(1 for s in speakers if s.startswith("espeak-")),
        "conditions": dict(sorted(out.conditions.items())),
        "formats": dict(sorted(out.formats.items())),
        "defects": sum(out.defects.values()),
        "defect_kinds": dict(sorted(out.defects.items())),
        "hours": round(out.seconds / 3600.0, 4),
    }


def build_demo_corpus(
    store: ObjectStore,
    demo: DemoConfig,
    sample_rate: int,
    *,
    weeks: int | None = None,
    seed: int | None = None,
    defects_per_drop: int | None = None,
    golden_utterances: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``weeks`` weekly drops under ``incoming/`` and golden set ``demo.golden_version``
    under ``golden/``.

    ``weeks``, ``seed`` and ``defects_per_drop`` override the ``demo`` fields of the same
    name; ``golden_utterances`` overrides the golden version's size (v1:
    ``demo.golden_utterances``; v2, v3: their recipe's, :data:`pipeline.demo.golden.RECIPES`,
    scaled in proportion). Existing drops of the same ids are replaced; an existing golden
    version is left as it is when identical and refused (:class:`CorpusError`) when it would
    change. Raises :class:`CorpusError` for an unknown golden version and
    :class:`FsddNotFoundError` when ``demo.fsdd_dir`` holds no usable FSDD copy.
    Returns a JSON-able summary: the drops (ids, URIs, counts, speakers, accents, conditions,
    formats, defects) and the golden set (version, URIs, seen/unseen counts, composition).
    """
    started = time.monotonic()
    weeks = demo.weeks if weeks is None else weeks
    seed = demo.seed if seed is None else seed
    defects_per_drop = demo.defects_per_drop if defects_per_drop is None else defects_per_drop
    if weeks < 1:
        raise CorpusError(f"weeks must be >= 1, got {weeks}")
    if defects_per_drop < 0:
        raise CorpusError(f"defects_per_drop must be >= 0, got {defects_per_drop}")
    version = demo.golden_version
    size = default_size(version, demo) if golden_utterances is None else golden_utterances
    fsdd = FsddRecordings(demo.fsdd_path(), sample_rate, GOLDEN_SPEAKERS)
    golden_plans = plan_golden(version, demo, size, fsdd, seed)
    week_plans = [plan_week(w) for w in range(1, weeks + 1)]
    drop_rngs = [drop_rng(seed, p.week) for p in week_plans]
    drop_plans = [
        plan_drop(p, demo, demo.utterances_per_week, fsdd, rng) for p, rng in zip(week_plans, drop_rngs, strict=True)
    ]

    total = len(golden_plans) + sum(len(p) for p in drop_plans)
    with (
        ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as speech_pool,
        ThreadPoolExecutor(max_workers=8) as writers,
        tqdm(total=total, desc="demo corpus", unit="utt", file=sys.stderr, disable=not progress) as bar,
        single_threaded_torch(),
    ):
        # eSpeak runs in fresh processes while FSDD utterances are rendered here.
        golden_speech = _submit_speech(speech_pool, golden_plans)
        drop_speech = [_submit_speech(speech_pool, plans) for plans in drop_plans]
        golden = _build_golden(store, demo, seed, golden_plans, golden_speech, fsdd, sample_rate, writers, bar)
        drops = [
            _build_drop(store, plan, plans, speech, rng, fsdd, sample_rate, defects_per_drop, writers, bar)
            for plan, plans, speech, rng in zip(week_plans, drop_plans, drop_speech, drop_rngs, strict=True)
        ]
    return {
        "store_root": store.root,
        "seed": seed,
        "sample_rate": sample_rate,
        "weeks": weeks,
        "drops": drops,
        "golden": golden,
        "utterances": total,
        "elapsed_s": round(time.monotonic() - started, 2),
    }


def _build_golden(
    store: ObjectStore, demo: DemoConfig, seed: int, plans: Sequence[UtterancePlan], speech: Future | None,
    fsdd: FsddRecordings, sample_rate: int, writers: ThreadPoolExecutor, bar: tqdm,
) -> dict[str, Any]:
    """Render and write the golden set and its ``meta.json`` (refused if that version would change)."""
    version = demo.golden_version
    prefix = join("golden", version)
    golden = _render_set(plans, speech, fsdd, sample_rate, prefix, bar)
    _check_golden_unchanged(store, prefix, "".join(golden.lines).encode("utf-8"))
    manifest_key = _write_set(store, golden, writers)
    meta = golden_meta(version, golden.records, seed, sample_rate, demo)
    meta_key = join(prefix, "meta.json")
    store.put_text(meta_key, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return {
        "version": version,
        "prefix": prefix + "/",
        "manifest_uri": store.uri(manifest_key),
        "meta_uri": store.uri(meta_key),
        "utterances": meta["utterances"],
        "seen_utterances": meta["seen_utterances"],
        "unseen_utterances": meta["unseen_utterances"],
        "held_out_speakers": meta["held_out_speakers"],
        "held_out_voices": meta["held_out_voices"],
        "conditions": dict(sorted(golden.conditions.items())),
        "min_group_utterances": meta.get("min_group_utterances"),
    }


def _build_drop(
    store: ObjectStore, plan: WeekPlan, plans: Sequence[UtterancePlan], speech: Future | None,
    rng: np.random.Generator, fsdd: FsddRecordings, sample_rate: int, defects_per_drop: int,
    writers: ThreadPoolExecutor, bar: tqdm,
) -> dict[str, Any]:
    """Render one weekly drop, salt its defects, replace any earlier copy, write it; its summary."""
    prefix = join("incoming", plan.drop_id)
    out = _render_set(plans, speech, fsdd, sample_rate, prefix, bar)
    _salt_defects(out, plan.drop_id, defects_per_drop, plans, fsdd, sample_rate, rng)
    store.delete_prefix(prefix + "/")
    return _drop_summary(store, plan, out, _write_set(store, out, writers))
