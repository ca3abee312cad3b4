"""What a search leaves to read: parameter importance, plots, and its MLflow runs.

``importance.json`` is Optuna's fANOVA over the trials that reached the top rung (their
top-rung score), or over all finished trials' best values when fewer than three did;
``curves.png`` draws each trial's metric per epoch with the rungs; ``importance.png`` the
importances. MLflow: one parent run per search (tag ``asr_kind=search``) with a nested run
per trial, replaced when a retried stage logs again.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.run import RunContext
from pipeline.stages.search.rungs import RungPlan
from pipeline.stages.search.space import SearchSpace, optuna_distributions


def importance(space: SearchSpace, board: list[dict[str, Any]]) -> dict[str, float]:
    import optuna

    top = [(r, r["top_rung"].get("score", r["top_rung"]["dev_wer"])) for r in board if r["top_rung"]]
    if len(top) < 3:
        top = [(r, r["best_metric"]) for r in board
               if r["status"] in ("completed", "asha_stopped") and r["best_metric"] is not None]
    if len(top) < 3:
        return {}
    dists = optuna_distributions(space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    for r, value in top:
        params = {k: v for k, v in r["config"].items() if k in dists}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params}, value=value))
    try:
        imp = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError):
        return {}
    return {k: round(float(v), 4) for k, v in imp.items()}


def plots(board: list[dict[str, Any]], imp: dict[str, float], out: Path, metric: str, plan: RungPlan) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cap = 2.1 if metric != "dev_loss" else float("inf")
    for r in board:
        if r["metric_curve"]:
            e, w = zip(*[(e, min(w, cap)) for e, w in r["metric_curve"]])
            label = f"#{r['trial_number']} {r['trial_id']} ({r['status']}{', ' + r['source'] if r['incumbent'] else ''})"
            ax.plot(e, w, marker="o", ms=3, alpha=0.8, lw=2.5 if r["incumbent"] else 1.2, label=label)
    for rung in plan.rungs:
        ax.axvline(rung, color="grey", ls=":", lw=1)
    ax.set_xlabel("epoch (dotted: ASHA rungs; the last is the top rung)")
    ax.set_ylabel(f"{metric} (proxy dev split)")
    ax.set_title(f"Search: {metric} per trial (thick: the incumbent)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(out / "curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if imp:
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(imp) + 1))
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names], color="#3b7dd8")
        ax.set_xlabel("fANOVA importance")
        fig.tight_layout()
        paths.append(out / "importance.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def log_mlflow(ctx: RunContext, board: list[dict[str, Any]], best: dict[str, Any], files: list[Path],
               summary: dict[str, Any]) -> str:
    import mlflow

    from pipeline.tracking import SEARCH_EXPERIMENT, quiet_mlflow, setup_mlflow

    quiet_mlflow()
    exp = setup_mlflow(ctx.config.mlflow, SEARCH_EXPERIMENT)
    client = mlflow.MlflowClient()
    # a retried stage replaces what an earlier attempt logged for this run
    for old in client.search_runs([exp], filter_string=f"tags.asr_run_id = '{ctx.run_id}'"):
        client.delete_run(old.info.run_id)
    selection = summary.get("selection") or {}
    tags = {"asr_run_id": ctx.run_id, "asr_kind": "search", "selection": str(selection.get("decision")),
            "selection_reason": str(selection.get("reason"))[:5000]}
    with mlflow.start_run(experiment_id=exp, run_name=f"search {ctx.run_id}", tags=tags) as parent:
        mlflow.log_params({f"best.{k}": v for k, v in best.items()})
        mlflow.log_metrics({k: v for k, v in summary.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
        for f in files:
            mlflow.log_artifact(str(f))
        for r in board:
            trial_tags = {"asr_run_id": ctx.run_id, "asr_kind": "trial", "status": r["status"],
                          "stop_reason": r["stop_reason"], "source": str(r["source"] or "")}
            with mlflow.start_run(experiment_id=exp, run_name=r["trial_id"], nested=True, tags=trial_tags):
                mlflow.log_params(r["config"])
                for epoch, wer in r["curve"]:
                    if math.isfinite(wer):
                        mlflow.log_metric("dev_wer", wer, step=epoch)
        return parent.info.run_id
