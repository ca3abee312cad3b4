"""The ASR library: vocabulary, front end, model, the one training loop, export and evaluation."""
