"""Speech data: audio decoding, text normalization, NeMo manifests, the training pool,
the feature shards and datasets."""
