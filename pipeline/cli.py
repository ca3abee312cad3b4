"""The ``asr-retune`` command line: parse arguments, call one library function, print.

Every command takes ``--config FILE`` (or ``ASR_RETUNE_CONFIG``; default
``configs/local.yaml``) and prints its result as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from pipeline.config import ConfigError, load_config

EXIT_USAGE = 2
EXIT_FAILED = 1


def _common(p: argparse.ArgumentParser, *, run: bool = False) -> None:
    p.add_argument("--config", metavar="FILE", help="configuration YAML (default: $ASR_RETUNE_CONFIG or configs/local.yaml)")
    p.add_argument("--root", metavar="ROOT", help="object-store root: a folder, file://... or s3://bucket/prefix (default: storage.root)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if run:
        p.add_argument("--run-id", metavar="ID", help="run id (default: a new one; reuse it to resume a run)")


def _context(args: argparse.Namespace):
    from pipeline.run import RunContext

    config = load_config(args.config)
    return RunContext.create(config, run_id=getattr(args, "run_id", None), root=args.root)


def cmd_config(args: argparse.Namespace) -> dict[str, Any]:
    return load_config(args.config).model_dump(mode="json")


def cmd_demo_data(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.demo.corpus import build_demo_corpus
    from pipeline.storage import open_store

    config = load_config(args.config)
    store = open_store(args.root, config.storage)
    return build_demo_corpus(
        store,
        config.demo,
        config.audio.sample_rate,
        weeks=args.weeks,
        seed=args.seed,
        defects_per_drop=args.defects,
        progress=not args.quiet,
    )


def cmd_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.stages.ingest.stage import ingest

    return ingest(_context(args), progress=not args.quiet)


def cmd_features(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.stages.features import extract_features

    return extract_features(_context(args), progress=not args.quiet)


def cmd_proxy(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.stages.proxy import sample_proxy

    return sample_proxy(_context(args), fraction=args.fraction, seed=args.seed)


def cmd_search(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.stages.search.stage import search

    return search(_context(args), trials=args.trials, budget_s=args.budget, progress=not args.quiet)


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.stages.train import train_full

    hparams = None
    if args.hparams:
        with open(args.hparams, encoding="utf-8") as f:
            hparams = json.load(f)
        if not isinstance(hparams, dict):
            raise ValueError(f"{args.hparams} must hold a JSON object of hyperparameters")
    return train_full(_context(args), hparams=hparams, epochs=args.epochs)


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.asr.evaluation import evaluate
    from pipeline.storage import open_store

    config = load_config(args.config)
    store = open_store(args.root, config.storage)
    result = evaluate(
        args.model, args.manifest, store, batch_size=args.batch_size, storage_config=config.storage, mlflow_config=config.mlflow
    )
    if not args.json:
        groups = result.pop("per_group")
        result["per_group"] = {k: f"{v['wer']:.3f} ({v['n_utts']} utts)" for k, v in groups.items()}
    return result


def cmd_transcribe(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.asr.evaluation import transcribe_files

    return transcribe_files(args.model, args.files)


def cmd_gate(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.stages.gate.stage import gate

    return gate(_context(args), candidate_key=args.candidate, force_reason=args.force_reason, actor=args.actor)


def cmd_register(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.stages.register import register

    return register(_context(args), actor=args.actor)


def cmd_promote(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.stages.register import promote

    return promote(_context(args), args.version, reason=args.reason, actor=args.actor)


def cmd_rollback(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.stages.deploy.stage import rollback_serving
    from pipeline.stages.register import rollback

    ctx = _context(args)
    result: dict[str, Any] = {}
    if not args.serving_only:
        result = rollback(ctx, reason=args.reason, actor=args.actor)
    if not args.registry_only:
        result["serving"] = rollback_serving(ctx, to_version=result.get("to_version"))
    return result


def cmd_deploy(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.stages.deploy.stage import deploy, deploy_registered
    from pipeline.stages.register import promote

    ctx = _context(args)
    if not args.model_key and not args.version:
        return deploy_registered(ctx, force=args.force)
    return deploy(
        ctx,
        candidate_model_key=args.model_key or ctx.stage_key("train", "model.pt"),
        version=args.version,
        on_promote=lambda v: promote(ctx, v, reason=f"canary healthy in run {ctx.run_id}", actor="canary"),
        force=args.force,
    )


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.stages.deploy.stage import serving_status, stop_serving

    config = load_config(args.config)
    return serving_status(config) if args.action == "status" else stop_serving(config)


def cmd_history(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.stages.register import registry_history

    return registry_history(_context(args))


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.demo.weekly import run_demo, run_demo_airflow

    config = load_config(args.config)
    runner = run_demo_airflow if args.airflow else run_demo
    return runner(config, root=args.root, progress=not args.quiet, echo=not args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asr-retune",
        description="Weekly re-tuning and retraining of a speech-recognition model, shipped only when measurably better.",
        epilog="Run 'asr-retune COMMAND --help' for a command's options. Artifacts live under ROOT/runs/RUN_ID/STAGE/.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="print the effective configuration (file + environment overrides)")
    _common(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "demo-data",
        help="write the demo corpus: weekly drops under ROOT/incoming/ and a golden set under ROOT/golden/",
        description="Build digit-sequence utterances from real FSDD recordings and eSpeak NG voices. "
        "The same seed gives byte-identical files.",
    )
    _common(p)
    p.add_argument("--weeks", type=int, help="number of weekly drops (default: demo.weeks)")
    p.add_argument("--seed", type=int, help="random seed (default: demo.seed)")
    p.add_argument("--defects", type=int, metavar="N", help="salt each drop with N defective records (default: demo.defects_per_drop)")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser(
        "ingest",
        help="validate new drops from ROOT/incoming/ into a new training-pool version; quarantine the rest",
        description="Takes every drop not yet in the ledger (ROOT/state/ingest/ledger.json). "
        "accepted + len(quarantined) + unparseable_lines == lines_read, always.",
    )
    _common(p, run=True)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("features", help="compute cached log-mel features for the current training pool")
    _common(p, run=True)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("proxy", help="draw a stratified proxy sample (with its own dev split) of the training pool")
    _common(p, run=True)
    p.add_argument("--fraction", type=float, help="share of the pool in the proxy (default: proxy.fraction)")
    p.add_argument("--seed", type=int, help="sampling seed (default: proxy.seed)")
    p.set_defaults(func=cmd_proxy)

    p = sub.add_parser(
        "search",
        help="Ray Tune ASHA + Optuna TPE search on the run's proxy set; writes runs/RUN_ID/search/best_config.json",
        description="Trials train on the proxy and report dev WER every epoch; ASHA stops weak ones early. "
        "Re-running a run id whose search was interrupted restores the experiment (Tuner.restore).",
    )
    _common(p, run=True)
    p.add_argument("--trials", type=int, help="number of trials (default: search.trials)")
    p.add_argument("--budget", type=float, metavar="SECONDS", help="wall-clock budget (default: search.budget_s)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "train",
        help="full DDP training (Ray Train) on the run's features; exports runs/RUN_ID/train/model.pt",
        description="Trains the configured model (or --hparams, e.g. a search's best_config.json) with "
        "train.num_workers DDP workers; a retried run resumes from its last checkpoint.",
    )
    _common(p, run=True)
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--hparams", metavar="JSON", help="a JSON file of hyperparameters laid over model:/train:")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="WER/CER (jiwer), per-group WER and real-time factor of an exported model on a manifest",
    )
    _common(p)
    p.add_argument("--model", required=True, help="exported model file (model.pt) or a registry URI: models:/asr@production, models:/asr/3")
    p.add_argument("--manifest", required=True, help="manifest: a path, file:// or s3:// URI, or a key under ROOT")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("transcribe", help="print the transcript of audio files (WAV/FLAC, any rate, mono or stereo)")
    _common(p)
    p.add_argument("--model", required=True, help="exported model file (model.pt)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser(
        "gate",
        help="evaluate the run's candidate and the production model on the golden set; write decision.json and report.html",
        description="Rules (gate: in the config): WER ceiling, paired-bootstrap ΔWER vs production, worst group, "
        "real-time factor. Cold start (no production model): absolute rules only.",
    )
    _common(p)
    p.add_argument("--run-id", metavar="ID", required=True, help="the run whose candidate (runs/ID/train/model.pt) is gated")
    p.add_argument("--candidate", metavar="KEY", help="another candidate: a store key or a local .pt file")
    p.add_argument("--force-reason", metavar="TEXT", help="force a pass (recorded in decision, report and registry); never the default")
    p.add_argument("--actor", metavar="WHO", help="who is acting (default: $ASR_RETUNE_ACTOR or the login name)")
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("register", help="register the run's gated candidate in MLflow (one version per run), alias challenger")
    _common(p)
    p.add_argument("--run-id", metavar="ID", required=True, help="the run whose gate passed")
    p.add_argument("--actor", metavar="WHO")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("promote", help="move alias production to a registered version (recorded: when, who, why, from, to)")
    _common(p)
    p.add_argument("--version", required=True, help="registered model version")
    p.add_argument("--reason", required=True, help="why (recorded)")
    p.add_argument("--actor", metavar="WHO")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser(
        "rollback",
        help="move alias production back to the previous production version, and serve it again in TorchServe",
    )
    _common(p, run=True)
    p.add_argument("--reason", required=True, help="why (recorded)")
    p.add_argument("--actor", metavar="WHO")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--serving-only", action="store_true", help="restore the previous version in TorchServe/router without moving the alias")
    only.add_argument("--registry-only", action="store_true", help="move the alias only; leave serving as it is")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser(
        "deploy",
        help="canary the run's registered candidate through TorchServe + the router (5%% -> 25%% -> 100%%); promote or roll back",
        description="Outcome and every step's measurements in runs/RUN_ID/deploy/canary.json. "
        "A healthy canary moves MLflow alias production (recorded); an unhealthy one leaves production untouched.",
    )
    _common(p, run=True)
    p.add_argument("--model-key", metavar="KEY", help="store key of the exported candidate (default: runs/RUN_ID/train/model.pt)")
    p.add_argument("--version", metavar="VERSION", help="serving version name (default: the run's registered MLflow version)")
    p.add_argument("--force", action="store_true", help="run again although the run's deploy stage is complete")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("serve", help="status or stop of the local TorchServe + router")
    _common(p)
    p.add_argument("action", choices=["status", "stop"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("history", help="every move of the registry aliases (when, who, why, from, to) and where they point now")
    _common(p)
    p.set_defaults(func=cmd_history)

    p = sub.add_parser(
        "demo",
        help="week by week: write the week's demo drop, then run the weekly pipeline on it (what 'make demo' runs)",
    )
    _common(p)
    p.add_argument("--airflow", action="store_true", help="run each week as the Airflow DAG (airflow dags test) instead of in-process")
    p.set_defaults(func=cmd_demo)
    return parser


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
        return
    for key, value in result.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
            if len(value) > 200:
                value = value[:197] + "..."
        print(f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], dict[str, Any]] = args.func
    try:
        result = func(args)
    except ConfigError as exc:
        print(f"asr-retune: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("asr-retune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line for the user, traceback with ASR_RETUNE_DEBUG
        import os

        if os.environ.get("ASR_RETUNE_DEBUG"):
            raise
        print(f"asr-retune {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        print("  (set ASR_RETUNE_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILED
    if args.command == "demo" and not args.json:
        return 0  # the demo has printed its progress and where the results are
    _print(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
