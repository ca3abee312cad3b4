"""One test per ingest validation rule (pure functions), plus the audio helpers they rely on."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile as sf
from support.wavfactory import make_audio, record, sha256

from pipeline.data.audio import AudioDecodeError, decode_audio, encode_wav, rms_dbfs, to_mono_resampled
from pipeline.stages.ingest.rules import (
    Reason,
    Rejected,
    check_audio_unique,
    check_checksum,
    check_duration_bounds,
    check_duration_matches,
    check_fields,
    check_finite,
    check_loudness,
    check_sample_rate,
    check_size,
    check_utt_id_unique,
    decode_line,
    decode_record_audio,
    drop_utt_id,
    normalize_transcript,
    parse_object,
    resolve_drop_audio_key,
)
from pipeline.stages.ingest.stage import fetch_audio
from pipeline.storage import open_store

DROP = "incoming/week-01"
DROP_URI = "s3://bucket/prefix/incoming/week-01/"


def reason_of(fn, *args) -> Reason:
    with pytest.raises(Rejected) as caught:
        fn(*args)
    assert caught.value.message  # every rejection explains itself
    return caught.value.reason


# --- unparseable / bad_text -------------------------------------------------------------


@pytest.mark.parametrize("line", ["not json", '{"utt_id": "a"', "[1, 2]", '"a string"', "42", "null"])
def test_unparseable(line: str) -> None:
    assert reason_of(parse_object, line) is Reason.UNPARSEABLE


def test_parse_object_accepts_an_object() -> None:
    assert parse_object('{"utt_id": "a"}') == {"utt_id": "a"}


def test_bad_text_invalid_utf8() -> None:
    raw = b'{"utt_id": "u1", "text": "four \xff one"}'
    with pytest.raises(Rejected) as caught:
        decode_line(raw)
    assert caught.value.reason is Reason.BAD_TEXT
    offset = raw.index(b"\xff")
    assert "0xff" in caught.value.message and f"offset {offset}" in caught.value.message


def test_bad_text_unpaired_surrogate() -> None:
    assert reason_of(check_fields, record("u1", "a.wav", text="four \ud800")) is Reason.BAD_TEXT


@pytest.mark.parametrize("text", ["", "   ", "?!", "--"])
def test_bad_text_empty_after_normalization(text: str) -> None:
    assert reason_of(normalize_transcript, text) is Reason.BAD_TEXT


@pytest.mark.parametrize("text", ["café", "four 七", "naïve"])
def test_bad_text_outside_the_vocabulary(text: str) -> None:
    with pytest.raises(Rejected) as caught:
        normalize_transcript(text)
    assert caught.value.reason is Reason.BAD_TEXT and "vocabulary" in caught.value.message


def test_transcript_is_normalized() -> None:
    assert normalize_transcript("Four 15!") == "four one five"


# --- missing_field --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["audio_filepath", "duration", "text"])
def test_missing_field(name: str) -> None:
    with pytest.raises(Rejected) as caught:
        check_fields(record("u1", "a.wav", **{name: None}))
    assert caught.value.reason is Reason.MISSING_FIELD and name in caught.value.message


def test_a_plain_nemo_record_needs_only_audio_filepath_duration_and_text() -> None:
    rec = check_fields({"audio_filepath": "a.wav", "duration": 1.2, "text": "one"})
    assert (rec.utt_id, rec.speaker, rec.group, rec.sha256) == (None, "unknown", "unknown", None)
    nulls = check_fields({"audio_filepath": "a.wav", "duration": 1, "text": "one", "speaker": None, "group": None})
    assert (nulls.speaker, nulls.group) == ("unknown", "unknown")


@pytest.mark.parametrize(
    "override",
    [
        {"duration": "1.0"},
        {"duration": True},
        {"duration": math.nan},
        {"duration": math.inf},
        {"utt_id": 7},
        {"utt_id": "  "},
        {"audio_filepath": ""},
        {"speaker": ["a"]},
        {"sha256": "not-a-digest"},
    ],
)
def test_missing_field_wrong_type(override: dict) -> None:
    assert reason_of(check_fields, record("u1", "a.wav", **override)) is Reason.MISSING_FIELD


def test_check_fields_returns_typed_record() -> None:
    rec = check_fields(record("u1", "a.wav", duration=2, sha256="AB" * 32, extra="ignored"))
    assert rec.duration == 2.0 and isinstance(rec.duration, float)
    assert rec.sha256 == "ab" * 32 and rec.utt_id == "u1"


# --- path_escape ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "../week-02/a.wav",
        "sub/../../x.wav",
        "sub/../a.wav",
        "/etc/passwd",
        "s3://other-bucket/a.wav",
        "s3://bucket/prefix/incoming/week-02/a.wav",
        "file:///etc/passwd",
        "https://example.com/a.wav",
        "a//b.wav",
        "sub/",
        ".",
        "a\x00.wav",
        "a\nb.wav",
        "x" * 1100 + ".wav",
    ],
)
def test_path_escape(path: str) -> None:
    assert reason_of(resolve_drop_audio_key, path, DROP, DROP_URI) is Reason.PATH_ESCAPE


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("a.wav", "incoming/week-01/a.wav"),
        ("./sub/a.wav", "incoming/week-01/sub/a.wav"),
        (DROP_URI + "sub/a.flac", "incoming/week-01/sub/a.flac"),
    ],
)
def test_paths_inside_the_drop_resolve(path: str, key: str) -> None:
    assert resolve_drop_audio_key(path, DROP, DROP_URI) == key


LOCAL_URI = "file:///srv/asr%20store/incoming/week-01/"  # a drop of a local store (a space in its path)
LOCAL_DIR = "/srv/asr store/incoming/week-01/"


@pytest.mark.parametrize(
    ("path", "key"),
    [
        (LOCAL_DIR + "a.wav", "incoming/week-01/a.wav"),  # NeMo writes absolute paths to its own files
        (LOCAL_DIR + "sub/./a.flac", "incoming/week-01/sub/a.flac"),
        (LOCAL_URI + "sub/a.wav", "incoming/week-01/sub/a.wav"),
        ("file://" + LOCAL_DIR + "b.wav", "incoming/week-01/b.wav"),  # a file:// URI not percent-encoded
        ("file://localhost" + LOCAL_DIR + "c.wav", "incoming/week-01/c.wav"),
        ("a.wav", "incoming/week-01/a.wav"),
    ],
)
def test_absolute_paths_and_file_uris_inside_a_local_drop_resolve(path: str, key: str) -> None:
    assert resolve_drop_audio_key(path, DROP, LOCAL_URI) == key


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/etc/passwd", "outside this drop's folder /srv/asr store/incoming/week-01/"),
        ("/srv/asr store/incoming/week-02/a.wav", "outside this drop's folder"),
        ("/srv/asr store/incoming/week-01-b/a.wav", "outside this drop's folder"),
        ("/srv/asr store/incoming/week-01", "outside this drop's folder"),
        (LOCAL_DIR + "../week-02/a.wav", "contains '..'"),
        ("file:///etc/passwd", "outside this drop's folder"),
        ("file://otherhost" + LOCAL_DIR + "a.wav", "another host"),
        (LOCAL_DIR + "sub//a.wav", "not a clean relative path"),
    ],
)
def test_absolute_paths_outside_a_local_drop_escape(path: str, says: str) -> None:
    with pytest.raises(Rejected) as caught:
        resolve_drop_audio_key(path, DROP, LOCAL_URI)
    assert caught.value.reason is Reason.PATH_ESCAPE
    assert says in caught.value.message and repr(path) in caught.value.message


def test_a_local_absolute_path_in_a_drop_on_s3_escapes_and_says_why() -> None:
    with pytest.raises(Rejected) as caught:
        resolve_drop_audio_key("/data/incoming/week-01/a.wav", DROP, DROP_URI)
    assert caught.value.reason is Reason.PATH_ESCAPE and DROP_URI in caught.value.message


@pytest.mark.parametrize(
    ("path", "utt_id"),
    [
        ("audio/0001.wav", "week-01:audio-0001"),
        (LOCAL_DIR + "audio/0001.wav", "week-01:audio-0001"),  # the same file, however it is written
        (LOCAL_URI + "audio/0001.wav", "week-01:audio-0001"),
        ("./audio/spk 2/0001.flac", "week-01:audio-spk-2-0001"),
    ],
)
def test_drop_utt_id_is_the_drop_and_the_audio_path_within_it(path: str, utt_id: str) -> None:
    assert drop_utt_id(path, "week-01", DROP, LOCAL_URI) == utt_id


def test_drop_utt_id_of_an_escaping_path_is_a_path_escape() -> None:
    assert reason_of(drop_utt_id, "/etc/passwd", "week-01", DROP, LOCAL_URI) is Reason.PATH_ESCAPE


# --- missing_audio / too_large / checksum_mismatch ------------------------------------


def test_missing_audio(tmp_path) -> None:
    store = open_store(str(tmp_path))
    assert reason_of(fetch_audio, store, "incoming/week-01/nope.wav", 1000) is Reason.MISSING_AUDIO


def test_too_large(tmp_path) -> None:
    store = open_store(str(tmp_path))
    store.put_bytes("incoming/week-01/big.wav", b"x" * 101)
    assert reason_of(check_size, 101, 100) is Reason.TOO_LARGE
    assert reason_of(fetch_audio, store, "incoming/week-01/big.wav", 100) is Reason.TOO_LARGE
    assert fetch_audio(store, "incoming/week-01/big.wav", 101) == b"x" * 101


def test_checksum_mismatch() -> None:
    assert reason_of(check_checksum, "a" * 64, "b" * 64) is Reason.CHECKSUM_MISMATCH
    check_checksum(None, "b" * 64)
    check_checksum("b" * 64, "b" * 64)


# --- duplicates -----------------------------------------------------------------------


def test_duplicate_utt_id() -> None:
    with pytest.raises(Rejected) as caught:
        check_utt_id_unique("u1", {"u1": "week-01"})
    assert caught.value.reason is Reason.DUPLICATE_UTT_ID
    assert caught.value.duplicate_of == {"utt_id": "u1", "drop": "week-01"}
    check_utt_id_unique("u2", {"u1": "week-01"})


def test_duplicate_audio_names_the_original() -> None:
    digest = sha256(make_audio(seed=1))
    with pytest.raises(Rejected) as caught:
        check_audio_unique(digest, {digest: ("w1-0003", "week-01")})
    assert caught.value.reason is Reason.DUPLICATE_AUDIO
    assert caught.value.duplicate_of == {"utt_id": "w1-0003", "drop": "week-01"}
    assert "w1-0003" in caught.value.message and "week-01" in caught.value.message
    check_audio_unique(sha256(make_audio(seed=2)), {digest: ("w1-0003", "week-01")})


# --- undecodable / non_finite ---------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"definitely not audio", b"RIFF\x00\x00\x00\x00WAVEfmt "])
def test_undecodable(data: bytes) -> None:
    assert reason_of(decode_record_audio, data) is Reason.UNDECODABLE


def test_undecodable_truncated_flac() -> None:
    flac = make_audio(fmt="FLAC", subtype="PCM_16", seed=3)
    assert reason_of(decode_record_audio, flac[:30]) is Reason.UNDECODABLE


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad: float) -> None:
    samples = np.full((800, 1), 0.1, dtype=np.float32)
    samples[100, 0] = bad
    wave, _ = decode_audio(make_audio(samples=samples, subtype="FLOAT"))
    assert reason_of(check_finite, wave) is Reason.NON_FINITE
    check_finite(np.zeros((1, 10), dtype=np.float32))


# --- silent / too_short / too_long / duration_mismatch --------------------------------


def test_silent() -> None:
    zeros = to_mono_resampled(decode_audio(make_audio(amplitude=0.0))[0], 8000, 8000)
    assert rms_dbfs(zeros) == -math.inf
    assert reason_of(check_loudness, rms_dbfs(zeros), -60.0) is Reason.SILENT
    whisper = to_mono_resampled(decode_audio(make_audio(amplitude=0.0005, subtype="FLOAT"))[0], 8000, 8000)
    assert rms_dbfs(whisper) < -60.0
    assert reason_of(check_loudness, rms_dbfs(whisper), -60.0) is Reason.SILENT
    check_loudness(-20.0, -60.0)


def test_too_short_and_too_long() -> None:
    assert reason_of(check_duration_bounds, 0.05, 0.1, 30.0) is Reason.TOO_SHORT
    assert reason_of(check_duration_bounds, 0.0, 0.1, 30.0) is Reason.TOO_SHORT
    assert reason_of(check_duration_bounds, 30.5, 0.1, 30.0) is Reason.TOO_LONG
    check_duration_bounds(0.1, 0.1, 30.0)
    check_duration_bounds(30.0, 0.1, 30.0)


def test_duration_mismatch() -> None:
    assert reason_of(check_duration_matches, 1.0, 2.0, 0.25) is Reason.DURATION_MISMATCH
    assert reason_of(check_duration_matches, 1.3, 1.0, 0.25) is Reason.DURATION_MISMATCH
    check_duration_matches(1.0, 1.2, 0.25)


def test_every_reason_code_is_snake_case_and_unique() -> None:
    codes = [str(r) for r in Reason]
    assert len(codes) == len(set(codes))
    assert all(c.replace("_", "").isalpha() and c.islower() for c in codes)


# --- audio helpers ---------------------------------------------------------------------


def test_decode_stereo_44k_to_mono_8k() -> None:
    wave, sr = decode_audio(make_audio(seconds=0.5, sr=44100, channels=2, seed=4))
    assert wave.shape == (2, 22050) and wave.dtype == np.float32 and sr == 44100
    mono = to_mono_resampled(wave, sr, 8000)
    assert mono.shape == (4000,)
    assert mono.dtype.is_floating_point


def test_downmix_is_the_channel_mean() -> None:
    samples = np.stack([np.full(800, 0.5), np.full(800, -0.1)], axis=1).astype(np.float32)
    wave, sr = decode_audio(make_audio(samples=samples, subtype="FLOAT"))
    mono = to_mono_resampled(wave, sr, sr)
    assert np.allclose(mono.numpy(), 0.2, atol=1e-6)


def test_flac_decodes_like_wav() -> None:
    samples = (0.2 * np.sin(np.linspace(0, 200, 8000))).astype(np.float32)[:, None]
    from_wav, _ = decode_audio(make_audio(samples=samples, subtype="PCM_16"))
    from_flac, sr = decode_audio(make_audio(samples=samples, fmt="FLAC", subtype="PCM_16"))
    assert sr == 8000 and np.allclose(from_wav, from_flac, atol=2 / 32768)


def test_decode_error_is_typed() -> None:
    with pytest.raises(AudioDecodeError, match="cannot decode"):
        decode_audio(b"garbage bytes here")


def test_encode_wav_is_16_bit_clipped_and_deterministic() -> None:
    x = np.array([0.0, 0.5, -0.5, 2.0, -2.0], dtype=np.float32)
    data = encode_wav(x, 8000)
    assert data == encode_wav(x, 8000)
    wave, sr = decode_audio(data)
    assert sr == 8000 and wave.shape == (1, 5)
    assert wave[0, 3] == pytest.approx(1.0, abs=1e-4) and wave[0, 4] == -1.0
    assert sf.info(io.BytesIO(data)).subtype == "PCM_16"
    with pytest.raises(ValueError, match="mono"):
        encode_wav(np.zeros((2, 5), dtype=np.float32), 8000)


def test_rms_dbfs_of_full_scale_sine() -> None:
    t = np.arange(8000) / 8000
    assert rms_dbfs(np.sin(2 * np.pi * 100 * t)) == pytest.approx(-3.01, abs=0.01)
    assert rms_dbfs(np.array([])) == -math.inf


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000])
def test_standard_sample_rates_are_supported(rate: int) -> None:
    check_sample_rate(rate, 8000)
    check_sample_rate(rate, 16000)


@pytest.mark.parametrize("rate", [96001, 44101, 7919 * 13])
def test_odd_sample_rates_are_refused_before_resampling(rate: int) -> None:
    assert reason_of(check_sample_rate, rate, 16000) is Reason.UNSUPPORTED_SAMPLE_RATE


def test_deeply_nested_or_huge_json_is_unparseable() -> None:
    assert reason_of(parse_object, "[" * 100_000) is Reason.UNPARSEABLE
    assert reason_of(parse_object, '{"duration": ' + "9" * 5000 + "}") is Reason.UNPARSEABLE
