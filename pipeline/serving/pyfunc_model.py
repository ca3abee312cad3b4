"""The MLflow pyfunc wrapper around an exported asr-retune TorchScript model (models from code).

MLflow copies this file into each logged model (``mlflow.pyfunc.log_model(python_model=<this
file>)``), so it imports nothing from ``pipeline``: torch, numpy and pandas only. The
TorchScript file itself (artifact ``model``) is what evaluation and TorchServe load; this
wrapper only makes the registered version callable through ``mlflow.pyfunc.load_model``.

Input: a DataFrame with a column ``wave`` (one array of mono float samples per row, at the
model's sample rate, found in the model metadata as ``sample_rate``). Output: a DataFrame
with a column ``text`` (greedy CTC decoding, normalized words).
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import torch

META = "meta.json"


class ASRPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        extra = {META: ""}
        self.module = torch.jit.load(context.artifacts["model"], map_location="cpu", _extra_files=extra)
        self.module.eval()
        self.meta = json.loads(extra[META])
        self.tokens = list(self.meta["tokens"])
        self.blank = int(self.meta.get("blank", 0))

    def _decode(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        texts = []
        for ids, n in zip(log_probs.argmax(dim=-1).tolist(), lengths.tolist()):
            out, prev = [], -1
            for i in ids[:n]:
                if i != prev and i != self.blank:
                    out.append(self.tokens[i])
                prev = i
            texts.append(" ".join("".join(out).split()))
        return texts

    def predict(self, context, model_input, params=None):
        waves = [torch.as_tensor(np.asarray(w, dtype=np.float32)).flatten() for w in model_input["wave"]]
        if not waves:
            return pd.DataFrame({"text": []})
        lengths = torch.tensor([w.numel() for w in waves])
        batch = torch.zeros(len(waves), int(lengths.max()))
        for i, w in enumerate(waves):
            batch[i, : w.numel()] = w
        with torch.inference_mode():
            log_probs, out_lengths = self.module(batch, lengths)
        return pd.DataFrame({"text": self._decode(log_probs, out_lengths)})


mlflow.models.set_model(ASRPyfunc())
