"""Benchmark: training throughput through the project's data path, and DDP 2 workers vs 1.

    .venv/bin/python tests/benchmarks/bench_training.py [--utterances 300] [--ddp-epochs 2]

1. loader_ratio (without augmentation, then with augmented copies + VTLP + SpecAugment):
   utterances/s of training steps fed by the feature shards (memory-mapped
   float16 -> collate -> model) divided by utterances/s of the same steps (same model
   init, same batches, same thread count) fed tensors already collated in memory.
   Goal >= 0.9.
2. ddp: full training (Ray Train TorchTrainer, gloo) of the same configuration with
   1 and with 2 CPU workers for the same epochs: training utterances/s and wall time.
Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import nn

from pipeline.asr.training import build_model, build_optimizer, collate, make_batches
from pipeline.config import AugmentConfig, Config, DemoConfig, TrainConfig
from pipeline.data.dataset import IndexedFeatures
from pipeline.data.features import FeatureStore
from pipeline.demo.corpus import build_demo_corpus
from pipeline.run import RunContext
from pipeline.stages.features import extract_features
from pipeline.stages.ingest.stage import ingest
from pipeline.storage import open_store


def _prepare(root: Path, utterances: int, epochs: int, workers: int, augment: AugmentConfig | None = None) -> RunContext:
    config = Config(
        demo=DemoConfig(weeks=1, utterances_per_week=utterances, golden_utterances=10),
        train=TrainConfig(epochs=epochs, batch_size=16, num_workers=workers, max_failures=0),
        augment=augment or AugmentConfig(),
    )
    store = open_store(str(root))
    if not store.exists("golden/v1/manifest.jsonl"):
        build_demo_corpus(store, config.demo, config.audio.sample_rate, progress=False)
    ctx = RunContext(run_id=f"bench-w{workers}{'-aug' if config.augment.copies else ''}", config=config, store=store)
    ingest(ctx, progress=False)
    extract_features(ctx, progress=False)
    return ctx


def bench_loader(ctx: RunContext, repeats: int = 3) -> dict:
    """With ``augment`` on, both feeds read epoch 1's pick of copies and the model warps the mel axis."""
    torch.set_num_threads(1)
    fs = FeatureStore.open(ctx.store, ctx.run_id)
    cfg = ctx.config
    data = IndexedFeatures(fs).for_epoch(cfg.train.seed, 1)
    batches = make_batches(data.frames(), cfg.train.batch_size, 0, 0)
    ctc = nn.CTCLoss(zero_infinity=True)
    in_memory = [collate(data, idx) for idx in batches]

    def steps(feed) -> float:
        torch.manual_seed(0)
        model = build_model(cfg.model, fs.n_mels, fs.mean, fs.var, vtlp=cfg.augment.vtlp)
        opt = build_optimizer(model, cfg.train, cfg.train.lr)
        t0 = time.perf_counter()
        for item in feed():
            x, lengths, y, ylens = item
            log_probs, out_lengths = model(x, lengths)
            loss = ctc(log_probs.transpose(0, 1), y, out_lengths, ylens)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    loader_t, memory_t = [], []
    for _ in range(repeats):  # interleaved, best-of: other load hits both alike
        loader_t.append(steps(lambda: (collate(data, idx) for idx in batches)))
        memory_t.append(steps(lambda: iter(in_memory)))
    n = len(data)
    return {
        "benchmark": "training_loader",
        "augment": {"copies": cfg.augment.copies, "vtlp": cfg.augment.vtlp,
                    "specaugment": cfg.model.time_masks + cfg.model.freq_masks > 0},
        "utterances": n,
        "loader_utts_per_s": round(n / min(loader_t), 2),
        "in_memory_utts_per_s": round(n / min(memory_t), 2),
        "ratio": round(min(memory_t) / min(loader_t), 3),
        "goal": 0.9,
    }


def bench_ddp(root: Path, utterances: int, epochs: int) -> dict:
    from pipeline.stages.train import train_full

    out = {"benchmark": "ddp_workers", "epochs": epochs}
    for workers in (1, 2):
        ctx = _prepare(root, utterances, epochs, workers)
        summary = train_full(ctx)
        history = json.loads(ctx.store.get_text(ctx.stage_key("train", "history.json")))
        train_s = sum(h["seconds"] for h in history)
        n = sum(h["n_train"] for h in history)
        out[f"workers_{workers}"] = {
            "train_utts_per_s": round(n / train_s, 2),
            "stage_wall_s": summary["wall_s"],
        }
    out["speedup_2_vs_1"] = round(out["workers_2"]["train_utts_per_s"] / out["workers_1"]["train_utts_per_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=300)
    parser.add_argument("--ddp-epochs", type=int, default=2)
    parser.add_argument("--skip-ddp", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ctx = _prepare(root, args.utterances, 1, 1)
        print(json.dumps(bench_loader(ctx)), flush=True)
        augmented = _prepare(root, args.utterances, 1, 1, AugmentConfig(copies=2, vtlp=0.1))
        print(json.dumps(bench_loader(augmented)), flush=True)
        if not args.skip_ddp:
            print(json.dumps(bench_ddp(root, args.utterances, args.ddp_epochs)), flush=True)
            import ray

            ray.shutdown()


if __name__ == "__main__":
    main()
