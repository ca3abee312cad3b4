"""asr-retune: weekly re-tuning and retraining of an ASR model, shipped only when measurably better.

Packages show the kinds of code, and imports run one way (``tests/unit/test_layout.py``):

* core — ``config``, ``storage``, ``run``, ``ray``, ``tracking`` (all MLflow plumbing);
* ``data`` — audio, text, manifests, the training pool, feature shards, datasets;
* ``asr`` — vocabulary, front end, model, extraction, the one training loop, export, metrics;
* ``serving`` — archives, TorchServe, the routers (nginx, Istio), the handler;
* ``stages`` — one module per DAG task, each writing ``runs/{run_id}/{stage}/``;
* ``airflow`` — what the DAG and the plugin use; ``demo`` — the demo corpus and runner;
* ``cli`` — the ``asr-retune`` command, which only parses and forwards.
"""
