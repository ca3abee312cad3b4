"""Stage ``search``: the incumbent against Ray Tune ASHA + Optuna TPE on the proxy, selected with a margin."""

from pipeline.stages.search.stage import check_fidelity, load_best_config, search

__all__ = ["check_fidelity", "load_best_config", "search"]
