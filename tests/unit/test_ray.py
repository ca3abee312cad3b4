"""Placement requests of pipeline.ray: trials and DDP workers ask for the spot resource, and the
in-process Ray (``ray.address: null``) declares it, so they stay schedulable there."""

from __future__ import annotations

import pytest

from pipeline.config import Config, RayConfig, SearchConfig
from pipeline.ray import (
    SPOT_REQUEST,
    ensure_ray,
    in_process_resources,
    spot_resource,
    trial_resources,
    worker_resources,
)


def _without_spot(config: Config) -> Config:
    """``ray.spot_resource: null`` (set past validation while RayConfig may not have the field yet)."""
    return config.model_copy(update={"ray": config.ray.model_copy(update={"spot_resource": None})})


def test_trial_resources_are_the_search_cpus_gpus_and_a_sliver_of_spot():
    config = Config(search=SearchConfig(cpus_per_trial=2, gpus_per_trial=0.5))
    assert trial_resources(config) == {"cpu": 2, "gpu": 0.5, "spot": SPOT_REQUEST}


def test_worker_resources_keep_ray_trains_default_and_add_spot():
    config = Config()
    assert worker_resources(config, use_gpu=False) == {"CPU": 1.0, "spot": SPOT_REQUEST}
    assert worker_resources(config, use_gpu=True) == {"GPU": 1.0, "spot": SPOT_REQUEST}


def test_ray_train_takes_the_worker_resources_as_they_are():
    from ray.train import ScalingConfig

    config = Config()
    cpu = ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker=worker_resources(config, use_gpu=False))
    assert cpu._resources_per_worker_not_none == {"CPU": 1.0, "spot": SPOT_REQUEST}
    assert cpu.total_resources == {"CPU": 2.0, "spot": 2 * SPOT_REQUEST}
    gpu = ScalingConfig(num_workers=1, use_gpu=True, resources_per_worker=worker_resources(config, use_gpu=True))
    assert gpu._resources_per_worker_not_none == {"GPU": 1.0, "spot": SPOT_REQUEST}


def test_no_spot_resource_requests_nothing_extra():
    config = _without_spot(Config())
    assert spot_resource(config) is None
    assert trial_resources(config) == {"cpu": config.search.cpus_per_trial, "gpu": config.search.gpus_per_trial}
    assert worker_resources(config, use_gpu=False) == {"CPU": 1.0}
    assert in_process_resources(config) == {}


def test_in_process_ray_declares_as_much_spot_as_cpus():
    assert in_process_resources(Config(ray=RayConfig(num_cpus=3))) == {"spot": 3.0}


@pytest.fixture
def in_process_ray():
    import ray

    ray.shutdown()
    config = Config(ray=RayConfig(address=None, num_cpus=1))
    ensure_ray(config)
    yield config
    ray.shutdown()


def test_in_process_ray_schedules_trials_and_ddp_workers(in_process_ray):
    """A trial's placement group (as Tune builds it) and a DDP-worker-sized task both run in-process."""
    import ray
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    config = in_process_ray
    assert ray.cluster_resources().get("spot") == 1.0
    factory = resource_dict_to_pg_factory(trial_resources(config))
    assert factory.bundles[0]["spot"] == SPOT_REQUEST
    pg = factory.to_placement_group()
    try:
        assert pg.wait(timeout_seconds=30), f"trial placement group {factory.bundles} not schedulable in-process"
        in_trial = ray.remote(lambda: "trial").options(
            num_cpus=factory.bundles[0]["CPU"], scheduling_strategy=PlacementGroupSchedulingStrategy(pg))
        assert ray.get(in_trial.remote(), timeout=60) == "trial"
    finally:
        ray.util.remove_placement_group(pg)
    res = worker_resources(config, use_gpu=False)
    ddp_worker = ray.remote(lambda: "worker").options(num_cpus=res.pop("CPU"), resources=res)
    assert ray.get(ddp_worker.remote(), timeout=60) == "worker"
