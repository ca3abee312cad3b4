"""The ASR library: vocabulary, front end, model, feature extraction, the one training loop, export, evaluation and WER scoring."""
