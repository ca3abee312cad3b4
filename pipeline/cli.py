"""The ``asr-retune`` command line: parse arguments, call one library function, print.

Every command takes ``--config FILE`` (or ``ASR_RETUNE_CONFIG``; default
``configs/local.yaml``) and prints its result as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, the function it forwards to (whose docstring is its help) and its options."""

    name: str
    func: Callable[[argparse.Namespace], dict[str, Any]]
    run: bool  # takes --run-id (default: a new run)
    options: tuple[tuple[tuple[str, ...], dict[str, Any], bool], ...]

    def add_to(self, sub: Any) -> None:
        summary, _, details = (self.func.__doc__ or "").partition("\n\n")
        p = sub.add_parser(self.name, help=" ".join(summary.split()), description=" ".join(details.split()) or None)
        _common(p, run=self.run)
        group = None
        for flags, options, exclusive in self.options:
            if exclusive:
                group = group or p.add_mutually_exclusive_group()
            (group if exclusive else p).add_argument(*flags, **options)
        p.set_defaults(func=self.func)


COMMANDS: list[Command] = []


def option(*flags: str, exclusive: bool = False, **options: Any) -> Callable:
    """An ``add_argument`` of the command below (``exclusive``: at most one of the exclusive ones)."""

    def attach(func: Callable) -> Callable:
        func.__dict__.setdefault("cli_options", []).insert(0, (flags, options, exclusive))
        return func

    return attach


def command(name: str, *, run: bool = False) -> Callable:
    """Register the function below as subcommand ``name``."""

    def register(func: Callable) -> Callable:
        COMMANDS.append(Command(name, func, run, tuple(func.__dict__.get("cli_options", ()))))
        return func

    return register


ACTOR = ("--actor",), {"metavar": "WHO", "help": "who is acting (default: $ASR_RETUNE_ACTOR or the login name)"}
REASON = ("--reason",), {"required": True, "help": "why (recorded)"}
MODEL = ("--model",), {"required": True, "metavar": "MODEL", "help": (
    "the model (evaluate and transcribe resolve it alike): a registry URI (models:/asr@production, models:/asr/3), "
    "a run's model as a key under ROOT (runs/RUN_ID/train/model.pt), an exported model file (model.pt), or a "
    "file:// or s3:// URI of one")}


@command("config")
def cmd_config(args: argparse.Namespace) -> dict[str, Any]:
    """print the effective configuration (file + environment overrides)"""
    return load_config(args.config).model_dump(mode="json")


@command("demo-data")
@option("--weeks", type=int, help="number of weekly drops (default: demo.weeks)")
@option("--seed", type=int, help="random seed (default: demo.seed)")
@option("--defects", type=int, metavar="N", help="salt each drop with N defective records (default: demo.defects_per_drop)")
def cmd_demo_data(args: argparse.Namespace) -> dict[str, Any]:
    """write the demo corpus: weekly drops under ROOT/incoming/ and a golden set under ROOT/golden/

    Build digit-sequence utterances from real FSDD recordings and eSpeak NG voices. The same seed gives
    byte-identical files.
    """
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


@command("ingest", run=True)
def cmd_ingest(args: argparse.Namespace) -> dict[str, Any]:
    """validate new drops from ROOT/incoming/ into a new training-pool version; quarantine the rest

    Takes every drop not yet in the ledger (ROOT/state/ingest/ledger.json). accepted + len(quarantined)
    + unparseable_lines == lines_read, always. A drop's manifest.jsonl may be a plain NeMo manifest
    (audio_filepath, duration, text): audio_filepath is relative to the drop, or an absolute path or URI
    inside the drop's folder; a missing speaker or group is 'unknown', a missing utt_id is DROP_ID:PATH
    (the audio's path within the drop without its extension, each run of characters outside A-Za-z0-9_.+- as
    '-').
    """
    from pipeline.stages.ingest import ingest

    return ingest(_context(args), progress=not args.quiet)


@command("features", run=True)
def cmd_features(args: argparse.Namespace) -> dict[str, Any]:
    """compute cached log-mel features for the current training pool"""
    from pipeline.stages.features import extract_features

    return extract_features(_context(args), progress=not args.quiet)


@command("proxy", run=True)
@option("--fraction", type=float, help="share of the pool in the proxy (default: proxy.fraction)")
@option("--seed", type=int, help="sampling seed (default: proxy.seed)")
def cmd_proxy(args: argparse.Namespace) -> dict[str, Any]:
    """draw a stratified proxy sample (with its own dev split) of the training pool"""
    from pipeline.stages.proxy import sample_proxy

    return sample_proxy(_context(args), fraction=args.fraction, seed=args.seed)


@command("search", run=True)
@option("--trials", type=int, help="number of trials (default: search.trials)")
@option("--budget", type=float, metavar="SECONDS", help="wall-clock budget (default: search.budget_s)")
def cmd_search(args: argparse.Namespace) -> dict[str, Any]:
    """Ray Tune ASHA + Optuna TPE search on the run's proxy set; writes runs/RUN_ID/search/best_config.json

    Trials train on the proxy and report dev WER every epoch; ASHA stops weak ones early. Re-running a
    run id whose search was interrupted restores the experiment (Tuner.restore).
    """
    from pipeline.stages.search import search

    return search(_context(args), trials=args.trials, budget_s=args.budget, progress=not args.quiet)


@command("train", run=True)
@option("--epochs", type=int, help="override train.epochs")
@option("--hparams", metavar="JSON", help="a JSON file of hyperparameters laid over model:/train:", exclusive=True)
@option("--hparams-json", metavar="OBJECT", help="the same as a JSON object on the command line (a Ray Job's entrypoint)", exclusive=True)
def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    """full DDP training (Ray Train) on the run's features; exports runs/RUN_ID/train/model.pt

    Trains the configured model (or --hparams, e.g. a search's best_config.json) with train.num_workers
    DDP workers; a retried run resumes from its last checkpoint.
    """
    from pipeline.stages.train import train_full

    hparams = json.loads(args.hparams_json) if args.hparams_json else None
    if args.hparams:
        with open(args.hparams, encoding="utf-8") as f:
            hparams = json.load(f)
    if hparams is not None and not isinstance(hparams, dict):
        raise ValueError(f"{args.hparams or '--hparams-json'} must hold a JSON object of hyperparameters")
    return train_full(_context(args), hparams=hparams, epochs=args.epochs)


@command("evaluate")
@option(*MODEL[0], **MODEL[1])
@option("--manifest", required=True, help="manifest (NeMo JSON Lines): a path, file:// or s3:// URI, or a key under ROOT")
@option("--batch-size", type=int, default=16)
def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """WER/CER (jiwer), per-group WER and real-time factor of an exported model on a manifest

    The manifest needs only audio_filepath (relative to the manifest, absolute, file:// or s3://), duration
    and text; a missing speaker or group is 'unknown'.
    """
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


@command("transcribe")
@option(*MODEL[0], **MODEL[1])
@option("files", nargs="+", metavar="FILE")
def cmd_transcribe(args: argparse.Namespace) -> dict[str, Any]:
    """print the transcript of audio files (WAV/FLAC, any rate, mono or stereo)"""
    from pipeline.asr.evaluation import transcribe_files
    from pipeline.storage import open_store

    config = load_config(args.config)
    store = open_store(args.root, config.storage)
    return transcribe_files(args.model, args.files, store, storage_config=config.storage, mlflow_config=config.mlflow)


@command("gate")
@option("--run-id", metavar="ID", required=True, help="the run whose candidate (runs/ID/train/model.pt) is gated (required)")
@option("--candidate", metavar="KEY", help="another candidate: a store key or a local .pt file")
@option("--force-reason", metavar="TEXT", help="force a pass (recorded in decision, report and registry); never the default")
@option(*ACTOR[0], **ACTOR[1])
def cmd_gate(args: argparse.Namespace) -> dict[str, Any]:
    """evaluate the run's candidate and the production model on the golden set; write decision.json and
    report.html

    Rules (gate: in the config): WER ceiling, paired-bootstrap ΔWER vs production, worst group,
    real-time factor. Cold start (no production model): absolute rules only.
    """
    from pipeline.stages.gate import gate

    return gate(_context(args), candidate_key=args.candidate, force_reason=args.force_reason, actor=args.actor)


@command("register")
@option("--run-id", metavar="ID", required=True, help="the run whose gate passed (required)")
@option(*ACTOR[0], **ACTOR[1])
def cmd_register(args: argparse.Namespace) -> dict[str, Any]:
    """register the run's gated candidate in MLflow (one version per run), alias challenger"""
    from pipeline.stages.register import register

    return register(_context(args), actor=args.actor)


@command("promote")
@option("--version", required=True, help="registered model version")
@option(*REASON[0], **REASON[1])
@option(*ACTOR[0], **ACTOR[1])
def cmd_promote(args: argparse.Namespace) -> dict[str, Any]:
    """move alias production to a registered version (recorded: when, who, why, from, to)"""
    from pipeline.tracking import promote

    return promote(_context(args), args.version, reason=args.reason, actor=args.actor)


@command("rollback", run=True)
@option(*REASON[0], **REASON[1])
@option(*ACTOR[0], **ACTOR[1])
@option("--serving-only", action="store_true", help="restore the previous version in TorchServe/router without moving the alias", exclusive=True)
@option("--registry-only", action="store_true", help="move the alias only; leave serving as it is", exclusive=True)
def cmd_rollback(args: argparse.Namespace) -> dict[str, Any]:
    """move alias production back to the previous production version, and serve it again in TorchServe"""
    from pipeline.stages.deploy import rollback

    only = "serving" if args.serving_only else "registry" if args.registry_only else None
    return rollback(_context(args), reason=args.reason, actor=args.actor, only=only)


@command("deploy", run=True)
@option("--model-key", metavar="KEY", help="store key of the exported candidate (default: runs/RUN_ID/train/model.pt)")
@option("--version", metavar="VERSION", help="serving version name (default: the run's registered MLflow version)")
@option("--force", action="store_true", help="run again although the run's deploy stage is complete")
def cmd_deploy(args: argparse.Namespace) -> dict[str, Any]:
    """canary the run's registered candidate through TorchServe + the router (5%% -> 25%% -> 100%%);
    promote or roll back

    Outcome and every step's measurements in runs/RUN_ID/deploy/canary.json. A healthy canary moves
    MLflow alias production (recorded); an unhealthy one leaves production untouched.
    """
    from pipeline.stages.deploy import deploy_model

    return deploy_model(_context(args), model_key=args.model_key, version=args.version, force=args.force)


@command("cluster")
@option("action", choices=["up", "down", "status"])
def cmd_cluster(args: argparse.Namespace) -> dict[str, Any]:
    """up, down or status of the local multi-node Ray cluster: a head and ray.cluster.workers spot worker
    nodes on 127.0.0.1

    ray.address: auto makes the stages use it. Its record (addresses, ports, pids, logs) is under
    ray.cluster.dir; down stops only the processes recorded there.
    """
    from pipeline.cluster import cluster_down, cluster_status, cluster_up

    action = {"up": cluster_up, "down": cluster_down, "status": cluster_status}[args.action]
    return action(load_config(args.config))


@command("serve")
@option("action", choices=["status", "stop"])
def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    """status or stop of the local TorchServe + router"""
    from pipeline.serving.service import serving_status, stop_serving

    serving = load_config(args.config).serving
    return serving_status(serving) if args.action == "status" else stop_serving(serving)


@command("history")
def cmd_history(args: argparse.Namespace) -> dict[str, Any]:
    """every move of the registry aliases (when, who, why, from, to) and where they point now"""
    from pipeline.tracking import registry_history

    return registry_history(_context(args))


@command("demo")
@option("--airflow", action="store_true", help="run each week as the Airflow DAG (airflow dags test) instead of in-process")
def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    """week by week: write the week's demo drop, then run the weekly pipeline on it (what 'make demo' runs)"""
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
    for cmd in COMMANDS:
        cmd.add_to(sub)
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
