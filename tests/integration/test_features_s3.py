"""Feature extraction, the feature cache and the loader against moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from support.pool_factory import make_specs, write_pool

from pipeline.asr.frontend import FrontEnd, compute_log_mel
from pipeline.config import FeatureConfig
from pipeline.data.features import FeatureStore
from pipeline.run import RunContext
from pipeline.stages.features import extract_features
from pipeline.stages.proxy import sample_proxy

pytestmark = pytest.mark.integration


def test_features_on_s3_reuse_cache_and_load_through_local_copies(s3_bucket, s3_config, tmp_path):
    config = s3_config.model_copy(update={"features": FeatureConfig(shard_utterances=8, workers=4)})
    ctx = RunContext.create(config, run_id="w1", root=f"s3://{s3_bucket}/pipeline")
    store = ctx.store
    week1 = write_pool(store, make_specs(20, speakers=2), version="v1")

    first = extract_features(ctx, progress=False)
    assert (first["computed"], first["reused"], first["new_shards"]) == (20, 0, 3)
    assert first["index_uri"] == f"s3://{s3_bucket}/pipeline/runs/w1/features/index.json"

    write_pool(store, make_specs(2, prefix="new", seed=4), version="v2", reuse_rows=week1)
    second = extract_features(RunContext.create(config, run_id="w2", root=store.root), progress=False)
    assert (second["computed"], second["reused"], second["shards"]) == (2, 20, 4)

    cache_dir = tmp_path / "cache"
    fs = FeatureStore.open(store, "w2", cache_dir=cache_dir)
    fe = FrontEnd.from_config(FeatureConfig(), 8000)
    for i in (0, 7, 9, 21):  # shards 1, 1, 2 and the new one
        u = fs.utterances[i]
        wave, _ = sf.read(io.BytesIO(store.get_bytes(f"state/audio/{u['sha256'][:2]}/{u['sha256']}.wav")),
                          dtype="float32")
        feats, text = fs[i]
        assert isinstance(feats, np.memmap) and text == u["text"]
        np.testing.assert_array_equal(feats, compute_log_mel(wave, fe))
    downloaded = sorted(p.name for p in (cache_dir / fs.index["frontend_hash"]).iterdir())
    assert len(downloaded) == 3 and all(name.endswith(".npy") for name in downloaded)  # only the shards touched

    proxy = sample_proxy(RunContext.create(config, run_id="w2", root=store.root), fraction=0.5)
    assert proxy["proxy_size"] == 11 and proxy["pool_version"] == "v2"
