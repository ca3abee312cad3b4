"""The demo corpus builder (pipeline.demo.corpus, with its schedule, golden versions and
recordings) and eSpeak NG synthesis (pipeline.demo.tts).

Small corpora (2 weeks x 40 utterances + 30 golden v1, or + 100 golden v2) are built once per
module into LocalStores under tmp_path and shared by the read-only tests.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re

import numpy as np
import pytest
import soundfile as sf

from pipeline.config import DemoConfig, IngestConfig
from pipeline.data.manifest import parse_manifest
from pipeline.data.text import DIGIT_WORDS, normalize_text
from pipeline.demo.conditions import CONDITIONS, GOLDEN_ONLY
from pipeline.demo.corpus import DEFECT_KINDS, build_demo_corpus
from pipeline.demo.golden import V1_HELD_OUT_VOICES, V2_HELD_OUT_VOICES, group_composition
from pipeline.demo.recordings import DROP_TAKES, GOLDEN_TAKES, CorpusError, FsddNotFoundError
from pipeline.demo.schedule import DROP_SPEAKERS, HELD_OUT_SPEAKERS, plan_week
from pipeline.demo.tts import SpeechRequest, TtsError, synthesize, synthesize_isolated
from pipeline.demo.voices import DROP_ACCENTS, HELD_OUT_ACCENTS, HELD_OUT_VARIANTS, is_held_out
from pipeline.storage import LocalStore, ObjectStore

SAMPLE_RATE = 8000
REQUIRED = {
    "audio_filepath": str,
    "duration": float,
    "text": str,
    "speaker": str,
    "group": str,
    "utt_id": str,
    "sha256": str,
}
_FSDD_SOURCE = re.compile(r"^fsdd:(\d)_([a-z]+)_(\d+)$")
# golden/v1 of the `corpus` fixture (seed 1234, 30 utterances, 1-7 digits, 8 kHz) as first released:
# the manifest holds every audio file's sha256, so it pins the whole set.
V1_MANIFEST_SHA256 = "a30f0e33cb40a2775d69457f453fdadddf660e16865a15dce188f08970f990de"
V1_META_SHA256 = "4e69ee6c33c8637840658c490d387d874f3dc42458c726cfbbec016c5f84eb66"
V2_SMALL = 100  # golden v2 utterances in the small corpus: every speaker gets all four conditions


def small_demo(**overrides) -> DemoConfig:
    demo = DemoConfig(**{"weeks": 2, "utterances_per_week": 40, "golden_utterances": 30, **overrides})
    if not demo.fsdd_path().is_dir():
        pytest.skip(f"FSDD recordings not found at {demo.fsdd_path()} (set demo.fsdd_dir)")
    return demo


def build(root, **kwargs) -> tuple[ObjectStore, dict]:
    demo_overrides = kwargs.pop("demo", {})
    store = LocalStore(root)
    summary = build_demo_corpus(store, small_demo(**demo_overrides), SAMPLE_RATE, progress=False, **kwargs)
    return store, summary


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[ObjectStore, dict]:
    return build(tmp_path_factory.mktemp("corpus_a"))


@pytest.fixture(scope="module")
def corpus_same_seed(tmp_path_factory) -> tuple[ObjectStore, dict]:
    return build(tmp_path_factory.mktemp("corpus_b"))


@pytest.fixture(scope="module")
def corpus_with_defects(tmp_path_factory) -> tuple[ObjectStore, dict]:
    return build(tmp_path_factory.mktemp("corpus_defects"), defects_per_drop=len(DEFECT_KINDS) + 2)


@pytest.fixture(scope="module")
def corpus_v2(tmp_path_factory) -> tuple[ObjectStore, dict]:
    return build(tmp_path_factory.mktemp("corpus_v2"), demo={"golden_version": "v2"}, golden_utterances=V2_SMALL)


def manifest_keys(store: ObjectStore) -> list[str]:
    return [k for k in store.list("") if k.endswith("/manifest.jsonl")]


def records(store: ObjectStore, key: str) -> list[dict]:
    return [json.loads(line) for line in store.get_text(key).splitlines()]


def audio_key(manifest_key: str, record: dict) -> str:
    return posixpath.normpath(posixpath.join(posixpath.dirname(manifest_key), record["audio_filepath"]))


def drop_entries(store: ObjectStore) -> list[tuple[str, dict]]:
    """(manifest key, record) of every drop record."""
    return [(k, r) for k in manifest_keys(store) if k.startswith("incoming/") for r in records(store, k)]


def drop_records(store: ObjectStore) -> list[dict]:
    return [r for _, r in drop_entries(store)]


def golden_records(store: ObjectStore, version: str = "v1") -> list[dict]:
    return records(store, f"golden/{version}/manifest.jsonl")


def first_channel(store: ObjectStore, manifest_key: str, record: dict) -> np.ndarray:
    wave, _ = sf.read(io.BytesIO(store.get_bytes(audio_key(manifest_key, record))), dtype="float64", always_2d=True)
    return wave[:, 0]


def longest_zero_run(x: np.ndarray) -> int:
    edges = np.diff(np.concatenate([[0], (x == 0).astype(np.int8), [0]]))
    starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    return int((ends - starts).max()) if starts.size else 0


def espeak_rate(record: dict) -> int:
    return int(re.search(r":rate=(\d+)", record["source"][0])[1])


def fsdd_sources(recs: list[dict]) -> set[tuple[int, str, int]]:
    out = set()
    for r in recs:
        for source in r["source"]:
            m = _FSDD_SOURCE.match(source)
            if m:
                out.add((int(m[1]), m[2], int(m[3])))
    return out


def test_layout_and_summary(corpus):
    store, summary = corpus
    assert manifest_keys(store) == [
        "golden/v1/manifest.jsonl",
        "incoming/week-001/manifest.jsonl",
        "incoming/week-002/manifest.jsonl",
    ]
    assert store.exists("golden/v1/meta.json")
    assert [d["drop_id"] for d in summary["drops"]] == ["week-001", "week-002"]
    assert all(d["utterances"] == 40 and d["defects"] == 0 for d in summary["drops"])
    assert summary["golden"]["utterances"] == 30
    json.dumps(summary)  # JSON-able
    for key in store.list(""):  # nothing but manifests, their audio and the golden meta
        assert key.endswith(("manifest.jsonl", "meta.json", ".wav", ".flac")), key


def test_manifests_validate_and_audio_decodes(corpus):
    store, _ = corpus
    demo = small_demo()
    for key in manifest_keys(store):
        seen_ids = set()
        for line in store.get_text(key).splitlines():
            record = json.loads(line)
            for field, kind in REQUIRED.items():
                assert isinstance(record[field], kind), (key, field, record)
            assert record["utt_id"] not in seen_ids
            seen_ids.add(record["utt_id"])
            words = record["text"].split()
            assert words and all(w in DIGIT_WORDS for w in words), record
            assert demo.min_digits <= len(words) <= demo.max_digits
            assert normalize_text(record["text"]) == record["text"]
            assert record["duration"] > 0 and record["duration"] == round(record["duration"], 3)
            assert not record["audio_filepath"].startswith(("/", "..")) and "://" not in record["audio_filepath"]
            data = store.get_bytes(audio_key(key, record))
            assert hashlib.sha256(data).hexdigest() == record["sha256"]
            wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
            assert abs(wave.shape[0] / rate - record["duration"]) <= 0.010, record
            floor = IngestConfig().silence_floor_dbfs  # ingestion would quarantine anything quieter
            assert 20 * np.log10(np.sqrt(np.mean(wave**2))) > floor, f"{record['utt_id']} is nearly silent"
            assert np.abs(wave).max() < 1.0
            if key.startswith("incoming/"):
                assert record["condition"] in CONDITIONS and record["condition"] not in GOLDEN_ONLY, record
            else:
                assert "condition" not in record, "golden v1 records have no condition"


def test_drops_mix_formats_golden_is_uniform(corpus):
    store, _ = corpus
    kinds = []
    for key, r in drop_entries(store):
        info = sf.info(io.BytesIO(store.get_bytes(audio_key(key, r))))
        kinds.append((info.format, info.samplerate, info.channels))
    assert ("FLAC", SAMPLE_RATE, 1) in kinds
    assert ("WAV", 16000, 1) in kinds
    assert ("WAV", SAMPLE_RATE, 2) in kinds
    assert kinds.count(("WAV", SAMPLE_RATE, 1)) >= 0.85 * len(kinds)
    for r in golden_records(store):
        info = sf.info(io.BytesIO(store.get_bytes(audio_key("golden/v1/manifest.jsonl", r))))
        assert (info.format, info.samplerate, info.channels, info.subtype) == ("WAV", SAMPLE_RATE, 1, "PCM_16")


def test_golden_and_drops_share_no_recording_and_hold_out_speakers(corpus):
    store, _ = corpus
    golden, drops = golden_records(store), drop_records(store)
    golden_fsdd, drop_fsdd = fsdd_sources(golden), fsdd_sources(drops)
    assert golden_fsdd and drop_fsdd
    assert golden_fsdd.isdisjoint(drop_fsdd)
    assert {take for _, _, take in golden_fsdd} <= set(GOLDEN_TAKES)
    assert {take for _, _, take in drop_fsdd} <= set(DROP_TAKES)

    held_out = set(HELD_OUT_SPEAKERS) | {f"espeak-{v}" for v in V1_HELD_OUT_VOICES}
    drop_speakers = {r["speaker"] for r in drops}
    assert drop_speakers.isdisjoint(held_out)
    for speaker in drop_speakers:  # no drop voice has a held-out accent or variant
        assert not (speaker.startswith("espeak-") and is_held_out(speaker.removeprefix("espeak-"))), speaker
    assert {s for _, s, _ in drop_fsdd}.isdisjoint(HELD_OUT_SPEAKERS)
    assert {r["speaker"] for r in golden} >= held_out
    for r in golden:
        assert r["seen"] is (r["speaker"] not in held_out)
        if r["seen"] and r["speaker"].startswith("espeak-"):  # a voice the drops may speak with
            assert r["speaker"].removeprefix("espeak-") in plan_week(2).voices, r["speaker"]
        elif r["seen"]:
            assert r["speaker"] in drop_speakers, f"golden 'seen' speaker {r['speaker']} is in no drop"
    # No synthetic utterance repeats: golden rates are odd, drop rates even.
    assert all(espeak_rate(r) % 2 == 1 for r in golden if r["speaker"].startswith("espeak-"))
    assert all(espeak_rate(r) % 2 == 0 for r in drops if r["speaker"].startswith("espeak-"))

    meta = json.loads(store.get_text("golden/v1/meta.json"))
    assert meta["utterances"] == len(golden) == 30
    assert meta["unseen_utterances"] == sum(1 for r in golden if not r["seen"]) > 0
    assert meta["held_out_speakers"] == list(HELD_OUT_SPEAKERS)


def test_drops_change_week_to_week(corpus):
    store, summary = corpus
    speakers = [{r["speaker"] for r in records(store, f"incoming/week-00{w}/manifest.jsonl")} for w in (1, 2)]
    assert speakers[0] != speakers[1]
    assert set(summary["drops"][0]["fsdd_speakers"]) < set(summary["drops"][1]["fsdd_speakers"])

    plans = [plan_week(w) for w in range(1, 9)]
    assert len(plans[0].speakers) == 3 and len(plans[0].accents) == 3 and len(plans[0].voices) >= 30
    for earlier, later in zip(plans, plans[1:]):
        assert set(earlier.speakers) <= set(later.speakers) and set(earlier.voices) <= set(later.voices)
        assert (earlier.speakers, earlier.speaker_weights, earlier.accents, earlier.accent_weights) != (
            later.speakers, later.speaker_weights, later.accents, later.accent_weights
        )
        assert abs(sum(later.speaker_weights) - 1) < 1e-9 and abs(sum(later.accent_weights) - 1) < 1e-9
    assert set(plans[-1].speakers) == set(DROP_SPEAKERS) and set(plans[-1].accents) == set(DROP_ACCENTS)
    assert [p.drop_id for p in plans] == sorted(p.drop_id for p in plans)
    for plan in plans + [plan_week(52)]:
        assert not any(is_held_out(v) for v in plan.voices)
        assert set(plan.accents).isdisjoint(HELD_OUT_ACCENTS) and set(plan.variants).isdisjoint(HELD_OUT_VARIANTS)
    week2 = summary["drops"][1]
    assert week2["voices_used"] > 3 and set(week2["conditions"]) <= set(CONDITIONS) - set(GOLDEN_ONLY)


def test_same_seed_gives_byte_identical_files(corpus, corpus_same_seed):
    (a, _), (b, _) = corpus, corpus_same_seed
    keys = list(a.list(""))
    assert keys == list(b.list("")) and len(keys) > 100
    for key in keys:
        assert a.get_bytes(key) == b.get_bytes(key), key


def test_fewer_weeks_give_the_same_first_drops(corpus, tmp_path):
    store, _ = corpus
    one_week, _ = build(tmp_path / "one", weeks=1)
    keys = list(one_week.list(""))
    assert not any(k.startswith("incoming/week-002/") for k in keys)
    for key in keys:
        assert one_week.get_bytes(key) == store.get_bytes(key), key


def test_different_seed_gives_a_different_corpus(corpus, tmp_path):
    store, _ = corpus
    other, summary = build(tmp_path / "other", seed=99)
    assert summary["seed"] == 99
    for key in manifest_keys(store):
        assert other.get_text(key) != store.get_text(key), key
    def shas(s: ObjectStore) -> set[str]:
        return {r["sha256"] for k in manifest_keys(s) for r in records(s, k)}

    assert shas(store).isdisjoint(shas(other))


def test_defect_salting(corpus_with_defects):
    store, summary = corpus_with_defects
    for drop in summary["drops"]:
        key = f"incoming/{drop['drop_id']}/manifest.jsonl"
        lines = store.get_text(key).splitlines()
        assert len(lines) == 40 + len(DEFECT_KINDS) + 2
        regular = [json.loads(line) for line in lines[:40]]
        by_sha = {r["sha256"]: r for r in regular}
        kinds_seen = set()
        for line in lines[40:]:
            kind = re.search(r"defect-([a-z_]+)-week-", line)[1]
            kinds_seen.add(kind)
            if kind == "not_json":
                with pytest.raises(json.JSONDecodeError):
                    json.loads(line)
                continue
            record = json.loads(line)
            assert record["utt_id"].startswith(f"defect-{kind}-")
            if kind == "path_escape":
                assert record["audio_filepath"].startswith("../")
                continue
            audio = audio_key(key, record)
            if kind == "missing_audio":
                assert not store.exists(audio)
                continue
            data = store.get_bytes(audio)
            assert hashlib.sha256(data).hexdigest() == record["sha256"]
            if kind == "corrupt_audio":
                with pytest.raises(sf.LibsndfileError):
                    sf.read(io.BytesIO(data))
                continue
            wave, rate = sf.read(io.BytesIO(data), dtype="float32")
            if kind == "empty_text":
                assert record["text"] == "" and np.abs(wave).max() > 0.05  # drop levels reach -24 dBFS
            elif kind == "silent_audio":
                assert not wave.any() and record["text"]
            elif kind == "duration_mismatch":
                assert abs(len(wave) / rate - record["duration"]) > 1.0
            elif kind == "duplicate_audio":
                original = by_sha[record["sha256"]]
                assert data == store.get_bytes(audio_key(key, original))
                assert record["utt_id"] != original["utt_id"]
            if kind != "duplicate_audio":
                assert record["sha256"] not in by_sha, f"{kind} defect must not also be a duplicate"
        assert kinds_seen == set(DEFECT_KINDS)
        assert drop["defects"] == len(DEFECT_KINDS) + 2
        assert sum(drop["defect_kinds"].values()) == drop["defects"]


def test_golden_v1_is_byte_identical_to_its_first_release(corpus):
    store, _ = corpus
    assert hashlib.sha256(store.get_bytes("golden/v1/manifest.jsonl")).hexdigest() == V1_MANIFEST_SHA256
    assert hashlib.sha256(store.get_bytes("golden/v1/meta.json")).hexdigest() == V1_META_SHA256


def test_golden_manifests_of_both_versions_stay_readable(corpus, corpus_v2):
    for store, version in ((corpus[0], "v1"), (corpus_v2[0], "v2")):
        key = f"golden/{version}/manifest.jsonl"
        utts = parse_manifest(store.get_bytes(key), source=key)  # the evaluation's reader
        assert [u.utt_id for u in utts] == [r["utt_id"] for r in golden_records(store, version)]
        assert all(isinstance(r["seen"], bool) for r in golden_records(store, version))  # the gate's cohorts


def test_golden_v2_cohorts_conditions_and_leakage(corpus_v2):
    store, summary = corpus_v2
    golden, drops = golden_records(store, "v2"), drop_records(store)
    assert len(golden) == V2_SMALL == summary["golden"]["utterances"]
    unseen = {r["speaker"] for r in golden if not r["seen"]}
    assert unseen == set(HELD_OUT_SPEAKERS) | {f"espeak-{v}" for v in V2_HELD_OUT_VOICES} and len(unseen) >= 2
    for speaker in {r["speaker"] for r in golden}:  # every speaker is heard in every condition
        assert {r["condition"] for r in golden if r["speaker"] == speaker} == set(CONDITIONS), speaker
    for r in golden:
        voice = r["speaker"].removeprefix("espeak-")
        if r["speaker"].startswith("espeak-"):
            assert r["group"] == f"synthetic/{voice.split('+')[0]}"
            assert r["seen"] is (voice in plan_week(2).voices) is (not is_held_out(voice))
    assert {take for _, _, take in fsdd_sources(golden)} <= set(GOLDEN_TAKES)
    assert fsdd_sources(golden).isdisjoint(fsdd_sources(drops))
    assert {r["speaker"] for r in drops}.isdisjoint(unseen)
    assert {r["condition"] for r in drops}.isdisjoint(GOLDEN_ONLY)
    assert all(espeak_rate(r) % 2 == 1 for r in golden if r["speaker"].startswith("espeak-"))


def test_recordings_sound_as_their_condition_says(corpus_v2):
    store, _ = corpus_v2
    entries = [("golden/v2/manifest.jsonl", r) for r in golden_records(store, "v2")] + drop_entries(store)
    assert {r["condition"] for _, r in entries} == set(CONDITIONS)
    for key, r in entries:
        x = first_channel(store, key, r)
        rate = sf.info(io.BytesIO(store.get_bytes(audio_key(key, r)))).samplerate
        peak_dbfs = 20 * np.log10(np.abs(x).max())
        lead_mean = abs(float(x[: int(0.04 * rate)].mean()))  # lead silence: >= 50 ms before the speech
        if r["condition"] == "quiet":
            assert peak_dbfs <= -25.0, r
        else:
            assert -25.0 < peak_dbfs < 0.0, r
        if CONDITIONS[r["condition"]].digital_silence:
            assert longest_zero_run(x) >= 0.04 * rate and lead_mean == 0.0, r
        else:
            assert longest_zero_run(x) < 0.005 * rate, r
        if r["condition"] == "dc_offset":
            assert lead_mean >= 0.004, r
        else:
            assert lead_mean < 0.002, r


def test_golden_v2_meta_states_its_composition(corpus_v2):
    store, summary = corpus_v2
    golden = golden_records(store, "v2")
    meta = json.loads(store.get_text("golden/v2/meta.json"))
    assert meta["version"] == "v2" and meta["utterances"] == len(golden)
    assert meta["groups"] == group_composition(golden)
    assert {k.split(":")[0] for k in meta["groups"]} == {"speaker", "group", "cohort", "condition"}
    assert meta["groups"]["cohort:unseen"]["speakers"] >= 2
    assert meta["min_group_utterances"] == min(g["utterances"] for g in meta["groups"].values())
    assert meta["reserved_conditions"] == list(GOLDEN_ONLY) and set(meta["conditions"]) == set(CONDITIONS)
    assert meta["held_out_voices"] == [f"espeak-{v}" for v in V2_HELD_OUT_VOICES]
    assert meta["held_out_accents"] == list(HELD_OUT_ACCENTS) and meta["held_out_variants"] == list(HELD_OUT_VARIANTS)
    assert meta["words"] == sum(len(r["text"].split()) for r in golden)
    assert summary["golden"]["min_group_utterances"] == meta["min_group_utterances"]


def test_golden_v2_same_seed_gives_byte_identical_files(corpus_v2, tmp_path):
    store, _ = corpus_v2
    again, _ = build(tmp_path / "again", demo={"golden_version": "v2"}, golden_utterances=V2_SMALL)
    keys = list(store.list(""))
    assert keys == list(again.list("")) and any(k.startswith("golden/v2/") for k in keys)
    for key in keys:
        assert again.get_bytes(key) == store.get_bytes(key), key


def test_missing_fsdd_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-fsdd-here"
    store = LocalStore(tmp_path / "store")
    with pytest.raises(FsddNotFoundError) as err:
        build_demo_corpus(store, DemoConfig(fsdd_dir=str(missing)), SAMPLE_RATE, progress=False)
    assert str(missing) in str(err.value) and "demo.fsdd_dir" in str(err.value)
    assert list(store.list("")) == []


def test_incomplete_fsdd_folder_is_a_clear_error(tmp_path):
    fsdd = tmp_path / "fsdd"
    (fsdd / "recordings").mkdir(parents=True)
    (fsdd / "speakers.json").write_text(json.dumps({s: {"accent": "X"} for s in DROP_SPEAKERS + HELD_OUT_SPEAKERS}))
    with pytest.raises(FsddNotFoundError, match="demo.fsdd_dir"):
        build_demo_corpus(LocalStore(tmp_path / "store"), DemoConfig(fsdd_dir=str(fsdd)), SAMPLE_RATE, progress=False)


def test_an_existing_golden_version_is_never_rewritten(tmp_path):
    root = tmp_path / "store"
    tiny = {"utterances_per_week": 4, "golden_utterances": 6}
    build(root, demo=tiny, weeks=1)
    before = LocalStore(root).get_bytes("golden/v1/manifest.jsonl")
    build(root, demo=tiny, weeks=1)  # same seed: identical, accepted
    with pytest.raises(CorpusError, match="golden_version"):
        build(root, demo=tiny, weeks=1, seed=7)
    assert LocalStore(root).get_bytes("golden/v1/manifest.jsonl") == before
    store, summary = build(root, demo={**tiny, "golden_version": "v2"}, weeks=1, seed=7, golden_utterances=20)
    assert store.exists("golden/v2/manifest.jsonl") and summary["golden"]["version"] == "v2"
    assert store.get_bytes("golden/v1/manifest.jsonl") == before
    v2 = store.get_bytes("golden/v2/manifest.jsonl")
    store, summary = build(root, demo={**tiny, "golden_version": "v3"}, weeks=1, seed=7, golden_utterances=20)
    assert summary["golden"]["version"] == "v3" and summary["golden"]["utterances"] == 20
    assert json.loads(store.get_text("golden/v3/manifest.jsonl").splitlines()[0])["utt_id"] == "golden-v3-00000"
    assert store.get_bytes("golden/v2/manifest.jsonl") == v2 and store.get_bytes("golden/v1/manifest.jsonl") == before
    with pytest.raises(CorpusError, match="unknown golden version 'v9'.*demo.golden_version"):
        build(root, demo={**tiny, "golden_version": "v9"}, weeks=1)


def test_tts_speaks_one_two_three():
    wave, rate = synthesize("one two three", "en+f3", rate=175, pitch=50)
    assert rate == 22050 and wave.dtype == np.float32 and wave.ndim == 1
    assert 0.6 <= len(wave) / rate <= 3.0
    rms_dbfs = 20 * np.log10(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))
    assert rms_dbfs > -35
    slow, _ = synthesize("one two three", "en-us+m3", rate=120, pitch=30)
    assert len(slow) > len(wave)


def test_tts_isolated_batches_are_repeatable():
    requests = [SpeechRequest("four one five", "en+m1", 160, 40, seed=3), SpeechRequest("nine", "en+f2", 140, 60)]
    first, rate = synthesize_isolated(requests)
    second, _ = synthesize_isolated(requests)
    assert rate == 22050 and len(first) == 2
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_tts_errors_are_clear():
    with pytest.raises(TtsError, match="unknown eSpeak NG voice"):
        synthesize("one", "no-such-voice")
    with pytest.raises(TtsError, match="empty"):
        synthesize("  ", "en")
    with pytest.raises(TtsError, match="rate"):
        synthesize("one", "en", rate=10)


def test_tts_unloadable_library_is_a_clear_error(monkeypatch):
    import espeakng_loader

    import pipeline.demo.tts as tts

    monkeypatch.setattr(tts, "_engine", None)
    monkeypatch.setattr(espeakng_loader, "get_library_path", lambda: "/nonexistent/libespeak-ng.so")
    with pytest.raises(TtsError, match="cannot load the eSpeak NG library from /nonexistent"):
        synthesize("one", "en")
