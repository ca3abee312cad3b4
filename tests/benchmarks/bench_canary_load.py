"""Benchmark: N concurrent clients through the canary router for a whole canary.

    .venv/bin/python tests/benchmarks/bench_canary_load.py [--clients 8] [--max-seconds 120]
        [--root ROOT] [--model MODEL.pt]

Everything runs on 127.0.0.1 in a temp folder: TorchServe (1 worker per version) and nginx
are started, version ``prod`` is deployed (cold start), then a candidate (``cand``, the same
weights) goes through a full canary (``--steps``, default 5,25,100) while ``--clients``
threads send held-out audio through the router's split without pause. The load stops when
the canary ends, or at ``--max-requests`` / ``--max-seconds``. Audio: ROOT's golden set when
``--root`` holds one (e.g. the demo store), else synthetic noise utterances of 0.5-3 s; model:
``--model`` (an asr-retune export) or a tiny random-weight one.

Prints one JSON object: requests per version and status, ``prod_5xx`` (the goal is 0; also
``any_5xx`` and samples of any error),
client latency p50/p99 (ms), real-time factor (server compute / audio duration, p50/p99,
from the responses) and end-to-end RTF (client latency / audio duration), throughput, and
the canary's outcome and duration. Exit code 1 when production answered any 5xx or a request
failed in transport.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for wavfactory
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project, when run as a script

import numpy as np  # noqa: E402
import requests  # noqa: E402
from support.wavfactory import make_audio, sha256  # noqa: E402

from pipeline.config import CanaryConfig, Config, FeatureConfig, ModelConfig, ServingConfig  # noqa: E402
from pipeline.data.manifest import Utterance, write_manifest  # noqa: E402
from pipeline.run import RunContext  # noqa: E402
from pipeline.serving.router import ROUTED_VERSION_HEADER  # noqa: E402
from pipeline.serving.service import open_router  # noqa: E402
from pipeline.serving.torchserve import TorchServe  # noqa: E402
from pipeline.stages.deploy.replay import load_replay_set  # noqa: E402
from pipeline.stages.deploy.stage import deploy  # noqa: E402
from pipeline.storage import LocalStore, ObjectStore, open_store  # noqa: E402

GOLDEN = "bench"


def synthetic_golden(store: ObjectStore, n: int = 40) -> None:
    rng = np.random.default_rng(0)
    utts = []
    for i in range(n):
        seconds = float(rng.uniform(0.5, 3.0))
        audio = make_audio(seconds, 8000 if i % 2 else 16000, 1 + i % 2, seed=i)
        rel = f"audio/{i:03d}.wav"
        store.put_bytes(f"golden/{GOLDEN}/{rel}", audio)
        utts.append(Utterance(rel, seconds, "one two three", "s", "g", f"b{i:03d}", sha256(audio)))
    write_manifest(store, f"golden/{GOLDEN}/manifest.jsonl", utts)


def tiny_model(path: Path) -> None:
    import torch

    from pipeline.asr.export import export_model
    from pipeline.asr.frontend import frontend_settings
    from pipeline.asr.model import ASRModel
    from pipeline.asr.vocab import vocab_size

    torch.manual_seed(0)
    export_model(ASRModel(ModelConfig(d_model=64, num_layers=1), 40, vocab_size()), frontend_settings(FeatureConfig(), 8000),
                 path, {"version": "bench"})  # fmt: skip


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--max-requests", type=int, default=20000)
    parser.add_argument("--steps", default="5,25,100")
    parser.add_argument("--window-requests", type=int, default=40)
    parser.add_argument("--root", help="a store whose golden set to replay (default: synthetic audio)")
    parser.add_argument("--golden-version", default="v1")
    parser.add_argument("--model", help="an exported model (default: tiny random weights)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-canary-") as tmp:
        tmp_path = Path(tmp)
        store = LocalStore(tmp_path / "store")
        golden = GOLDEN
        if args.root and open_store(args.root).exists(f"golden/{args.golden_version}/manifest.jsonl"):
            source = open_store(args.root)
            for key in source.list(f"golden/{args.golden_version}/"):
                store.put_bytes(key.replace(f"golden/{args.golden_version}/", f"golden/{GOLDEN}/", 1), source.get_bytes(key))
            audio_source = f"{args.root} golden/{args.golden_version}"
        else:
            synthetic_golden(store)
            audio_source = "synthetic"
        model = tmp_path / "model.pt"
        if args.model:
            model.write_bytes(Path(args.model).read_bytes())
        else:
            tiny_model(model)
        store.upload_file("models/bench/model.pt", model)

        serving = ServingConfig(work_dir=str(tmp_path / "srv"), workers=1, batch_size=8, max_batch_delay_ms=5)
        canary = CanaryConfig(
            steps=[float(s) for s in args.steps.split(",")], window_requests=args.window_requests, paired_requests=10,
            window_s=30, concurrency=2, grace_period_s=1.0, golden_version=golden, replay_utterances=200,
        )  # fmt: skip
        backend = TorchServe(serving)
        router = open_router(serving, backend)
        utts = load_replay_set(store, golden, 200)
        t0 = time.monotonic()
        try:
            backend.ensure_running()
            router.ensure_running()
            startup_s = time.monotonic() - t0
            common = dict(candidate_model_key="models/bench/model.pt", backend=backend, router=router, serving=serving, canary=canary)
            deploy(RunContext("bench-prod", Config(), store), version="prod", **common)

            url, headers = router.target()
            stop = threading.Event()
            lock = threading.Lock()
            results: list[dict[str, Any]] = []
            deadline = time.monotonic() + args.max_seconds

            def client(k: int) -> None:
                session = requests.Session()
                i = k
                while not stop.is_set() and time.monotonic() < deadline:
                    with lock:
                        if len(results) >= args.max_requests:
                            return
                    u = utts[i % len(utts)]
                    i += args.clients
                    start = time.perf_counter()
                    try:
                        r = session.post(url, data=u.audio, headers={**headers, "Content-Type": u.content_type}, timeout=60)
                        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                        rec = {"version": r.headers.get(ROUTED_VERSION_HEADER), "status": r.status_code, "rtf": body.get("rtf"),
                               "duration": body.get("duration_s") or u.duration}  # fmt: skip
                        if r.status_code >= 500:
                            rec["error"] = r.text[:200]
                    except requests.RequestException as exc:
                        rec = {"version": None, "status": 0, "error": f"{type(exc).__name__}: {exc}"[:200], "duration": u.duration}
                    rec["latency_ms"] = (time.perf_counter() - start) * 1000.0
                    with lock:
                        results.append(rec)

            threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
            load_start = time.monotonic()
            for t in threads:
                t.start()
            outcome = deploy(RunContext("bench-canary", Config(), store), version="cand", **common)
            stop.set()
            for t in threads:
                t.join(timeout=90)
            load_s = time.monotonic() - load_start
        finally:
            router.stop()
            backend.stop()

    by: dict[str, dict[str, int]] = {}
    for r in results:
        by.setdefault(str(r["version"]), {}).setdefault(str(r["status"]), 0)
        by[str(r["version"])][str(r["status"])] += 1
    ok = [r for r in results if r["status"] == 200]
    prod_5xx = sum(1 for r in results if r["version"] == "prod" and r["status"] >= 500)
    transport = sum(1 for r in results if r["status"] == 0)
    result = {
        "benchmark": "canary_load",
        "clients": args.clients,
        "audio": audio_source,
        "requests": len(results),
        "by_version_status": by,
        "prod_5xx": prod_5xx,
        "any_5xx": sum(1 for r in results if r["status"] >= 500),
        "transport_errors": transport,
        "transport_error_samples": sorted({r["error"] for r in results if r["status"] == 0})[:3],
        "server_error_samples": sorted({f"{r['version']} {r['status']} {r.get('error')}" for r in results if r["status"] >= 500})[:3],
        "latency_ms_p50": pct([r["latency_ms"] for r in ok], 50),
        "latency_ms_p99": pct([r["latency_ms"] for r in ok], 99),
        "rtf_server_p50": pct([r["rtf"] for r in ok if r.get("rtf") is not None], 50),
        "rtf_server_p99": pct([r["rtf"] for r in ok if r.get("rtf") is not None], 99),
        "rtf_end_to_end_p50": pct([r["latency_ms"] / 1000.0 / r["duration"] for r in ok if r["duration"]], 50),
        "throughput_rps": round(len(results) / load_s, 2) if load_s else None,
        "audio_seconds_per_second": round(sum(r["duration"] for r in ok) / load_s, 2) if load_s else None,
        "load_seconds": round(load_s, 2),
        "startup_seconds": round(startup_s, 2),
        "canary_outcome": outcome["outcome"],
        "canary_reason": outcome["reason"],
        "canary_seconds": outcome.get("duration_s"),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    return 0 if prod_5xx == 0 and transport == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
