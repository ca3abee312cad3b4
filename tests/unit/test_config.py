from pathlib import Path

import pytest

from pipeline.config import DEFAULT_CONFIG, PROJECT_ROOT, Config, ConfigError, load_config


def test_default_local_config_loads():
    cfg = load_config(DEFAULT_CONFIG, environ={})
    assert cfg.storage.root == ".asr-retune/store"
    assert cfg.ray.address is None
    assert cfg.mlflow.tracking_uri.startswith("sqlite:///")


def test_production_example_loads_and_names_services():
    cfg = load_config(PROJECT_ROOT / "configs" / "production.example.yaml", environ={})
    assert cfg.storage.root.startswith("s3://")
    assert cfg.ray.submit == "job" and cfg.ray.address == "auto"  # heavy stages as Ray Jobs on the KubeRay head
    assert cfg.ray.dashboard_url and cfg.ray.dashboard_url.startswith("http://")
    assert cfg.mlflow.tracking_uri.startswith("http")


def test_yaml_round_trip(tmp_path: Path):
    cfg = load_config(DEFAULT_CONFIG, environ={})
    out = tmp_path / "rt.yaml"
    out.write_text(cfg.to_yaml())
    assert load_config(out, environ={}) == cfg


def test_env_override_keeps_types(tmp_path: Path):
    env = {"ASR_RETUNE__DEMO__WEEKS": "4", "ASR_RETUNE__STORAGE__ROOT": "s3://b/p", "UNRELATED": "x"}
    cfg = load_config(DEFAULT_CONFIG, environ=env)
    assert cfg.demo.weeks == 4 and isinstance(cfg.demo.weeks, int)
    assert cfg.storage.root == "s3://b/p"


def test_env_names_the_config_file(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("demo:\n  weeks: 3\n")
    monkeypatch.setenv("ASR_RETUNE_CONFIG", str(f))
    assert load_config().demo.weeks == 3


@pytest.mark.parametrize(
    "text, field, value",
    [
        ("demo:\n  weeks: -1\n", "demo.weeks", "-1"),
        ("storage:\n  root: ftp://x/y\n", "storage.root", "ftp://x/y"),
        ("ingest:\n  min_duration_s: 5\n  max_duration_s: 1\n", "ingest", "min_duration_s"),
        ("demo:\n  wekes: 2\n", "demo.wekes", "2"),
        ("features:\n  n_mels: lots\n", "features.n_mels", "lots"),
        ("search:\n  grace_period: 9\n  max_epochs: 8\n", "search", "grace_period (9) > max_epochs (8)"),
        ("serving:\n  host: 0.0.0.0\n", "serving.host", "loopback only"),
        ("serving:\n  nginx:\n    host: 10.0.0.1\n", "serving.nginx.host", "router binds to loopback"),
        ("canary:\n  steps: [50, 5]\n", "canary.steps", "must increase"),
    ],
)
def test_bad_file_names_field_and_value(tmp_path, text, field, value):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, environ={})
    msg = str(err.value)
    assert field in msg and value in msg and str(f) in msg


def test_bad_env_override_names_field(tmp_path):
    with pytest.raises(ConfigError, match=r"demo\.weeks.*'many'"):
        load_config(DEFAULT_CONFIG, environ={"ASR_RETUNE__DEMO__WEEKS": "many"})


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_not_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f, environ={})


def test_fsdd_path_relative_to_project():
    assert Config().demo.fsdd_path() == (PROJECT_ROOT / "../shared/data/fsdd").resolve()


def test_serving_sections_are_part_of_the_config():
    cfg = load_config(DEFAULT_CONFIG, environ={"ASR_RETUNE__CANARY__STEPS": "[10, 100]", "ASR_RETUNE__SERVING__ROUTER": "istio"})
    assert cfg.canary.steps == [10.0, 100.0] and cfg.serving.router == "istio"
    assert cfg.serving.istio.namespace == "asr-retune" and cfg.serving.nginx.host == "127.0.0.1"
