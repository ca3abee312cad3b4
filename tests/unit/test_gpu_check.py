"""tools/gpu_check.py and tools/gpu-check.sh, on CPU: the JSON it prints, its exit status with
no GPU, its generated corpus, and that it imports nothing the GPU machine cannot carry."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from pipeline.asr.vocab import encode_text
from pipeline.config import PROJECT_ROOT, load_config

TOOL = PROJECT_ROOT / "tools" / "gpu_check.py"
# not on the GPU machine (too big to carry, or not needed there); soundfile: the corpus is generated
FORBIDDEN = ("ray", "mlflow", "airflow", "boto3", "botocore", "ts", "torchserve", "optuna", "soundfile", "pipeline.stages")
TINY = ["--utterances", "12", "--dev-utterances", "4", "--cpu-utterances", "8", "--epochs", "1"]


def _env() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(PROJECT_ROOT)}


def _load_tool():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_run_prints_the_figures_and_imports_no_cluster_packages(tmp_path: Path):
    out = tmp_path / "gpu-check.json"
    # the forbidden packages cannot be imported at all (None in sys.modules), and none got loaded
    runner = textwrap.dedent(f"""
        import json, runpy, sys
        for name in {FORBIDDEN!r}:
            sys.modules[name] = None
        sys.argv = [{str(TOOL)!r}, "--allow-cpu", "--out", {str(out)!r}, *{TINY!r}]
        try:
            runpy.run_path({str(TOOL)!r}, run_name="__main__")
        except SystemExit as exc:
            code = exc.code
        loaded = sorted(m for m, v in sys.modules.items()
                        if v is not None and any(m == f or m.startswith(f + ".") for f in {FORBIDDEN!r}))
        print("LOADED=" + json.dumps(loaded))
        sys.exit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", runner], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "LOADED=[]"
    result = json.loads(out.read_text())
    assert result["ok"] is True and result["gpu"] is None and result["ratio"] is None
    assert result["device"] is None and result["amp"] is None
    assert result["torch"] == __import__("torch").__version__
    assert result["model"] == load_config().model.model_dump()  # the default model
    assert result["corpus"]["train"] == 12 and result["corpus"]["dev"] == 4
    cpu = result["cpu"]
    assert cpu["utterances"] == 8 and len(cpu["epochs"]) == 1
    assert result["cpu_utts_per_s"] == cpu["utts_per_s"] > 0
    assert cpu["final_train_loss_finite"] is True and np.isfinite(cpu["final_train_loss"])


def test_without_a_gpu_it_says_so_and_exits_2(tmp_path: Path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run(["bash", str(PROJECT_ROOT / "tools" / "gpu-check.sh"), "--out", str(out)],
                          env={**_env(), "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no CUDA GPU visible" in proc.stderr and "--allow-cpu" in proc.stderr
    result = json.loads(out.read_text())
    assert result["ok"] is False and "no CUDA GPU" in result["error"]


def test_missing_packages_without_wheels_is_a_setup_error(tmp_path: Path):
    # an interpreter that has torch but cannot import pydantic: the script names the fix
    shim = tmp_path / "python"
    shim.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""
        import runpy, sys
        sys.modules["pydantic"] = None
        if sys.argv[1:2] == ["-c"]:
            code, sys.argv = sys.argv[2], ["-c", *sys.argv[3:]]
            exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = sys.argv[1:]
            runpy.run_path(sys.argv[0], run_name="__main__")
    """))
    shim.chmod(0o755)
    proc = subprocess.run(["bash", str(PROJECT_ROOT / "tools" / "gpu-check.sh"), "--wheels", str(tmp_path / "none")],
                          env={**_env(), "PYTHON": str(shim)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "lacks pydantic" in proc.stderr and "--fetch-wheels" in proc.stderr


def test_generated_corpus_is_seeded_and_fits_the_vocabulary():
    tool = _load_tool()
    config = load_config()
    waves, texts = tool.make_corpus(6, config.audio.sample_rate, seed=3)
    again, texts2 = tool.make_corpus(6, config.audio.sample_rate, seed=3)
    assert texts == texts2 and all(np.array_equal(a, b) for a, b in zip(waves, again))
    assert all(w.dtype == np.float32 and w.ndim == 1 and np.isfinite(w).all() for w in waves)
    assert all(encode_text(t) and 1 <= len(t.split()) <= 5 for t in texts)
    feats = tool.featurize(config, waves)
    hop = int(round(config.features.hop_ms * config.audio.sample_rate / 1000))
    assert [f.shape for f in feats] == [(1 + w.size // hop, config.features.n_mels) for w in waves]
