"""asr-retune: weekly re-tuning and retraining of an ASR model."""
