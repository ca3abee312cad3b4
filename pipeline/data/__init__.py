"""Speech data: audio decoding, text normalization, NeMo manifests, the training pool and datasets."""
