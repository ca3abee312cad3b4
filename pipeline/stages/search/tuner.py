"""The Ray Tune experiment of a search: searcher, scheduler, and the ``Tuner`` (new or restored).

* :class:`TopRungOptunaSearch` — Ray's ``OptunaSearch``, except that a trial ASHA stopped
  below the top rung is told to Optuna as ``TrialState.PRUNED`` (with the intermediate values
  it reported), not as complete with its early value. TPE then ranks every complete
  (top-rung) trial above the pruned ones and learns only from top-rung values. The incumbent
  and warm-start points are enqueued with ``user_attrs`` saying where they come from.
* :func:`startup_trials` — TPE's random start-up, sized to the trial budget.
* :class:`IncumbentASHA` — ``ASHAScheduler`` that never stops the incumbent before the top rung.
* :class:`TrialProgress` — a Tune callback counting finished trials (:class:`pipeline.progress.Progress`).
* :func:`build_tuner` — a ``tune.Tuner`` over :func:`~pipeline.stages.search.trial.run_trial`,
  or ``Tuner.restore`` of the run's experiment when a retried stage finds one.

Checkpoints: trials checkpoint only at rungs and ``CheckpointConfig(num_to_keep=None)`` keeps
them (at most one per rung per trial). A ``num_to_keep`` forces an experiment-state snapshot
whenever a trial has checkpointed that often since the last one, which with frequent
checkpoints is what "Experiment state snapshotting has been triggered multiple times"
warned about; without it Tune snapshots on its own period only, which the search sets to
:data:`SNAPSHOT_PERIOD_S` (``TUNE_GLOBAL_CHECKPOINT_S``; Tune's "auto" is 10 s or more). The
snapshot is also what brings trials' ``result.json`` from the driver's staging folder to the
run's work area, and what a restored search starts from.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from pipeline.config import SearchConfig
from pipeline.run import RunContext
from pipeline.stages.search.incumbent import INCUMBENT_KEY, WARM_START_KEY
from pipeline.stages.search.rungs import TIME_ATTR, RungPlan
from pipeline.stages.search.space import SearchSpace, suggest
from pipeline.stages.search.trial import run_trial

log = logging.getLogger(__name__)

STAGE = "search"
SNAPSHOT_PERIOD_S = 5  # experiment-state snapshots (a few small files; ~10 ms on a local disk)


def define_trial(space: SearchSpace, trial) -> dict[str, Any] | None:
    """Optuna define-by-run. An enqueued incumbent suggests exactly its point (nothing sampled for
    what production's configuration leaves out of the space) and is marked ``_incumbent``."""
    source = trial.user_attrs.get("incumbent")
    if source:
        suggest(space, trial, only=set(trial.user_attrs.get("point") or {}))
        return {INCUMBENT_KEY: source}
    suggest(space, trial)
    warm = trial.user_attrs.get("warm_start")
    return {WARM_START_KEY: warm} if warm else None


class TopRungOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that reports trials stopped below ``max_t`` as pruned."""

    def __init__(self, *, max_t: int, enqueue: list[tuple[dict[str, Any], dict[str, Any]]], **kwargs: Any):
        super().__init__(**kwargs)
        self._max_t = max_t
        for point, attrs in enqueue:
            self._ot_study.enqueue_trial(point, user_attrs=attrs)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        stopped_early = (not error and result and trial_id in self._ot_trials
                         and trial_id not in self._completed_trials and result.get(TIME_ATTR, 0) < self._max_t)
        if not stopped_early:
            super().on_trial_complete(trial_id, result, error)
            return
        try:  # pruned at its last rung: Optuna keeps the intermediate values on_trial_result reported
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        except Exception as exc:  # noqa: BLE001 — as OptunaSearch does (e.g. a NaN)
            log.warning("could not tell Optuna trial %s was pruned: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


class IncumbentASHA(ASHAScheduler):
    """ASHA that lets the incumbent (config key ``_incumbent``) run to the top rung; its results
    still enter the rungs' cutoffs, so the others are judged against it."""

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if (action == TrialScheduler.STOP and (trial.config or {}).get(INCUMBENT_KEY)
                and result.get(self._time_attr, 0) < self._max_t):
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action


class TrialProgress(tune.Callback):
    """Counts finished trials (completed, stopped early or errored) and the best metric reported
    so far, for whoever watches the search (:mod:`pipeline.progress`)."""

    def __init__(self, trials: int, metric: str, enabled: bool) -> None:
        self.trials, self.metric, self.enabled = trials, metric, enabled
        self.best: float | None = None
        self._bar = None

    def setup(self, **info: Any) -> None:
        from pipeline.progress import Progress

        self._bar = Progress("search", self.trials, "trial", enabled=self.enabled)

    def _finished(self, trial: Any) -> None:
        value = (trial.last_result or {}).get(self.metric)
        if isinstance(value, (int, float)) and (self.best is None or value < self.best):
            self.best = float(value)
        if self._bar is not None:
            self._bar.update(1, **({f"best_{self.metric}": f"{self.best:.3f}"} if self.best is not None else {}))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished(trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self._bar is not None:
            self._bar.close()

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles the run config with the experiment
        return {**self.__dict__, "_bar": None}


def startup_trials(s: SearchConfig, trials: int) -> int:
    """TPE's random start-up: a quarter of the budget (1 to Optuna's default 10) unless configured.
    The incumbent and the warm-start points count toward it once they finish."""
    if s.n_startup_trials is not None:
        return s.n_startup_trials
    return max(1, min(10, round(trials / 4)))


def _sampler(s: SearchConfig, trials: int) -> optuna.samplers.BaseSampler:
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=startup_trials(s, trials), constant_liar=True)


def _scheduler(s: SearchConfig, plan: RungPlan):
    if s.scheduler == "fifo":
        return FIFOScheduler()
    return IncumbentASHA(time_attr=TIME_ATTR, max_t=plan.max_t, grace_period=plan.grace_period,
                         reduction_factor=plan.reduction_factor)


def _experiment(ctx: RunContext, data: dict[str, Any], name: str):
    """(trainable, storage path, storage filesystem, the restored Tuner or None) of experiment ``name``
    in the run's work area."""
    from pipeline.ray import ray_storage, trial_resources

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(SNAPSHOT_PERIOD_S))  # read when the experiment starts
    trainable = tune.with_resources(tune.with_parameters(run_trial, data=data), trial_resources(ctx.config))
    storage_path, storage_fs = ray_storage(ctx, STAGE)
    path = os.path.join(storage_path, name)
    if not tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
        return trainable, storage_path, storage_fs, None
    return trainable, storage_path, storage_fs, tune.Tuner.restore(
        path, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=storage_fs)


def build_tuner(ctx: RunContext, space: SearchSpace, data: dict[str, Any], plan: RungPlan,
                enqueue: list[tuple[dict[str, Any], dict[str, Any]]], trials: int,
                budget_s: float | None, progress: bool = False) -> tuple[tune.Tuner, bool]:
    """(tuner, restored): the run's experiment restored if an earlier attempt left one, else a new one."""
    s = ctx.config.search
    trainable, storage_path, storage_fs, restored = _experiment(ctx, data, "tune")
    if restored is not None:
        return restored, True
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = TopRungOptunaSearch(
        space=functools.partial(define_trial, space), metric=s.metric, mode="min",
        sampler=_sampler(s, trials), max_t=plan.max_t, enqueue=enqueue,
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=s.metric, mode="min",
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent),
            scheduler=_scheduler(s, plan),
            num_samples=trials,
            time_budget_s=budget_s,
            reuse_actors=True,  # a new trial reuses a finished one's worker: no process start, no imports
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            callbacks=[TrialProgress(trials, s.metric, progress)],
            verbose=1,
        ),
    )
    return tuner, False


def fidelity_tuner(ctx: RunContext, data: dict[str, Any], configs: list[dict[str, Any]]) -> tune.Tuner:
    """Train each of ``configs`` on the full pool (one Tune trial each, FIFO, no early stopping)."""
    s = ctx.config.search
    trainable, storage_path, storage_fs, restored = _experiment(ctx, data, "fidelity")
    if restored is not None:
        return restored
    return tune.Tuner(
        trainable,
        param_space={"_fidelity": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=s.max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name="fidelity", storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None), verbose=0,
        ),
    )

