"""Shared test helpers: real servers on 127.0.0.1 (MLflow, a fault proxy), factories of drops,
pools, runs, models and WAVs, serving and registry set-ups, and the reliability scorecard plugin."""
