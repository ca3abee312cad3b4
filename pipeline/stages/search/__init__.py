"""Stage ``search``: Ray Tune ASHA + Optuna TPE over the search space, on the proxy."""

from pipeline.stages.search.stage import load_best_config, search

__all__ = ["load_best_config", "search"]
