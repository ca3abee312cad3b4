"""The weekly run's stages, one module per DAG task; each writes ``runs/{run_id}/{stage}/``."""
