"""The pipeline's sections: storage, data, features, model, training, search, gate, orchestration, Ray, MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.base import Section, project_path


class StorageConfig(Section):
    """Where runs and state live: a local folder, ``file://...`` or ``s3://bucket/prefix``."""

    root: str = ".asr-retune/store"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    retry_max_attempts: int = Field(8, ge=1, le=20)
    retry_mode: Literal["standard", "adaptive", "legacy"] = "standard"
    multipart_threshold_mb: int = Field(8, ge=5)
    multipart_chunk_mb: int = Field(8, ge=5)
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)

    @field_validator("root")
    @classmethod
    def _root_scheme(cls, v: str) -> str:
        if "://" in v and not (v.startswith("file://") or v.startswith("s3://")):
            raise ValueError("root must be a local path, file://... or s3://bucket/prefix")
        if v.startswith("s3://") and len(v) <= len("s3://"):
            raise ValueError("s3:// root needs a bucket name")
        return v


class AudioConfig(Section):
    """The one front-end sample rate; every accepted utterance is converted to it."""

    sample_rate: int = Field(8000, ge=4000, le=48000)


class DemoConfig(Section):
    """The demo corpus built from FSDD recordings and eSpeak NG voices."""

    fsdd_dir: str = "../shared/data/fsdd"
    weeks: int = Field(3, ge=1, le=52)
    utterances_per_week: int = Field(600, ge=1)
    golden_utterances: int = Field(
        300, ge=1, description="size of golden v1; v2 and v3 have their recipe's size (1,490 and 4,000: pipeline.demo.golden.RECIPES)")
    synthetic_fraction: float = Field(0.35, ge=0.0, le=1.0)
    min_digits: int = Field(1, ge=1)
    max_digits: int = Field(7, ge=1)
    seed: int = 1234
    golden_version: str = Field(
        "v1", description=("golden set to build and gate on: v1 (300 utterances, no conditions), v2 (1,490, every checked "
                     "group >= 70) or v3 (4,000, every checked group >= 200: the gate's error rates meet their targets)"))
    defects_per_drop: int = Field(0, ge=0)
    ORDERED = (("min_digits", "max_digits", False),)

    def fsdd_path(self) -> Path:
        return project_path(self.fsdd_dir)


class IngestConfig(Section):
    """Validation rules applied to every incoming record."""

    min_duration_s: float = Field(0.1, gt=0)
    max_duration_s: float = Field(30.0, gt=0)
    duration_tolerance_s: float = Field(0.25, ge=0)
    silence_floor_dbfs: float = Field(-60.0, le=0)
    max_audio_bytes: int = Field(64 * 1024 * 1024, gt=0)
    ORDERED = (("min_duration_s", "max_duration_s", True),)


class FeatureConfig(Section):
    """Log-mel front end (torchaudio), the same in extraction, training, export and serving.

    ``level: rms`` scales each utterance to unit RMS (after removing its DC offset) before
    the mel transform, so the features do not depend on the recording level; ``dither_db``
    adds a fixed, deterministic noise that many dB below that level, so digital silence
    (exact zeros) gives finite, ordinary features (Kaldi dithers for the same reason);
    ``normalize`` subtracts each utterance's mean log-mel (``utterance``), a sliding-window
    mean (``sliding``, torchaudio's sliding-window CMN over ``cmn_window`` frames), or
    nothing (``global``: only the pool's per-bin statistics the model always applies).
    """

    n_mels: int = Field(40, ge=8, le=256)
    win_ms: float = Field(25.0, gt=0)
    hop_ms: float = Field(10.0, gt=0)
    level: Literal["none", "rms"] = "rms"
    dither_db: float | None = Field(-60.0, le=0, description="dither level re the utterance's RMS (dB); null = off")
    normalize: Literal["global", "utterance", "sliding"] = "global"  # the best of the three in make quality (README)
    cmn_window: int = Field(300, ge=10, le=10000, description="frames of the sliding-window mean (normalize: sliding)")
    shard_utterances: int = Field(512, ge=1)
    workers: int = Field(0, ge=0, description="0 = one per core")


class AugmentConfig(Section):
    """Training-time augmentation; evaluation and serving never augment.

    Waveform augmentations (speed, gain, additive noise; torchaudio ``Speed``, ``Vol`` and
    ``add_noise``) make ``copies`` augmented copies of every pool utterance at feature
    extraction, each with its own seeded draw, cached content-addressed beside the clean
    features; every epoch the training loop picks, per utterance, the clean features or one
    copy. Feature-domain augmentations run on the fly in the model in training mode only:
    vocal-tract-length warping of the mel axis (a factor in [1 - vtlp, 1 + vtlp]) and
    SpecAugment (``model.time_masks``/``freq_masks``, as before).
    """

    copies: int = Field(0, ge=0, le=8, description="augmented copies per utterance (0 = no waveform augmentation)")
    speed: list[float] = Field(default_factory=lambda: [0.9, 1.0, 1.1], description="speed factors a copy draws from")
    gain_db: tuple[float, float] | None = Field((-30.0, 6.0), description="a copy's random gain range (dB); null = off")
    noise_snr_db: tuple[float, float] | None = Field(
        (5.0, 30.0), description="SNR range (dB) of generated noise added to a copy; null = off")
    noise_prob: float = Field(0.5, ge=0, le=1, description="share of copies that get noise")
    vtlp: float = Field(0.0, ge=0, lt=0.5, description="mel-axis warp: factor in [1 - vtlp, 1 + vtlp]; 0 = off")
    seed: int = 0

    @field_validator("speed")
    @classmethod
    def _speeds(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.5 <= f <= 2.0 for f in v):
            raise ValueError("speed factors must be in [0.5, 2.0], at least one (1.0 = unchanged)")
        return v

    @field_validator("gain_db", "noise_snr_db")
    @classmethod
    def _range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError(f"range {list(v)}: the low end must not exceed the high end")
        return v


class ProxyConfig(Section):
    """The proxy set the search trains on: a seeded share of the pool, and its dev split."""

    fraction: float = Field(0.3, gt=0, le=1)
    dev_fraction: float = Field(0.15, gt=0, lt=1)
    seed: int = 7


class ModelConfig(Section):
    """Character CTC model; names match the search space's (configs/search_space.yaml)."""

    encoder: Literal["conformer", "lstm", "transformer"] = "conformer"
    num_layers: int = Field(2, ge=1, le=24)
    d_model: int = Field(144, ge=16, le=1024)
    attention_heads: int = Field(4, ge=1, le=16)
    ffn_mult: int = Field(4, ge=1, le=8)
    conv_kernel: int = Field(15, ge=3, le=63)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    subsample_channels: int = Field(32, ge=4, le=256)
    time_mask_width: int = Field(10, ge=0, le=100)
    time_masks: int = Field(2, ge=0, le=10)
    freq_mask_width: int = Field(8, ge=0, le=64)
    freq_masks: int = Field(2, ge=0, le=10)

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.encoder != "lstm" and self.d_model % self.attention_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by attention_heads ({self.attention_heads})"
            )
        if self.encoder == "conformer" and self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel ({self.conv_kernel}) must be odd for the conformer")
        return self


class TrainConfig(Section):
    """One training loop for search trials and full training."""

    epochs: int = Field(12, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=64)
    base_batch_size: int = Field(32, ge=1, description="lr is scaled by effective batch / base_batch_size")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0, le=10)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.98, gt=0, lt=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-2, ge=0, le=1)
    schedule: Literal["noam", "cosine", "plateau"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    clip_norm: float = Field(5.0, gt=0)
    max_grad_norm_abort: float = Field(1e4, gt=0, description="a gradient norm above this is divergence")
    seed: int = 0
    dev_fraction: float = Field(0.05, gt=0, lt=1, description="share of the pool held out for full-training dev")
    num_workers: int = Field(2, ge=1, le=256, description="DDP workers for full training (Ray Train)")
    use_gpu: bool = False
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="mixed precision when training on a GPU: auto = bf16 where the GPU supports it, else "
        "fp16 with a gradient scaler; off = float32. On CPU training is always float32",
    )
    max_failures: int = Field(2, ge=0, description="full training: restarts from the last checkpoint after a lost worker")
    hang_timeout_s: int = Field(
        600, ge=10, le=86400,
        description="full training: a worker that stops answering (a hung node) or a collective stuck this long "
        "fails the attempt, which then restarts from the last checkpoint",
    )
    report_poll_s: float = Field(
        0.25, gt=0, le=60,
        description="full training: how often Ray Train's controller collects the workers' reports and "
        "checkpoints (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; Ray's default is 2 s). A restart after a lost node "
        "resumes from the last checkpoint collected, so a checkpoint written less than this long before the "
        "loss is trained again",
    )
    init: Literal["scratch", "production", "search"] = Field(
        "scratch", description="full training: start from production's weights (production) or from the "
        "search's selected trial at the top rung (search: runs/RUN/search/chosen_weights.pt) when the "
        "architecture matches (same model and n_mels; otherwise scratch, recorded in metrics.json with the reason)",
    )


class SearchConfig(Section):
    """Ray Tune ASHA + Optuna TPE over ``space_file`` on the proxy set, with the incumbent as trial 0.

    The incumbent is production's configuration (its registered model's metadata), or the
    configured default at cold start. Rungs left unset (``max_epochs``, ``grace_period``,
    ``reduction_factor``: null) are sized from the proxy and the full-training budget: at the
    top rung a trial has seen ``top_rung_fraction`` of the utterances full training will. Only trials
    that reach the top rung can win, ranked by dev WER there (dev CER breaks ties); the winner
    replaces the incumbent only when its dev WER is at least ``min_improvement`` lower.
    """

    space_file: str = "configs/search_space.yaml"
    trials: int = Field(8, ge=1, le=10000)
    budget_s: float | None = Field(900.0, gt=0, description="wall-clock budget of the search (null: none)")
    max_epochs: int | None = Field(None, ge=1, le=1000, description="ASHA max_t (the top rung), in epochs; null: sized")
    grace_period: int | None = Field(None, ge=1, description="ASHA's first rung, in epochs; null: sized")
    reduction_factor: int | None = Field(None, ge=2, le=10, description="ASHA's reduction factor; null: 2")
    top_rung_fraction: float = Field(
        0.5, gt=0, le=1, description="sized rungs: the share of full training's utterances (epochs × pool) a "
        "trial has seen at the top rung")
    min_improvement: float = Field(
        0.01, ge=0, description="the winner replaces the incumbent only if its top-rung dev WER is this much lower")
    max_concurrent: int = Field(2, ge=1, le=1024)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    max_failures: int = Field(2, ge=0, description="per-trial retries from its last checkpoint (spot preemption)")
    seed: int = 0
    warm_start_top_k: int = Field(2, ge=0, le=50, description="best trials of earlier runs evaluated after the incumbent")
    n_startup_trials: int | None = Field(
        None, ge=0, description="TPE's random start-up trials; null: sized to the trial budget")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="fifo: no early stopping (a baseline)")
    sampler: Literal["tpe", "random"] = Field("tpe", description="random: Optuna's RandomSampler (a baseline)")
    metric: Literal["score", "dev_wer", "dev_cer", "dev_loss"] = Field(
        "score", description="what ASHA and TPE minimize; score: dev WER (+ CER/1000) where the model decodes, "
        "else 1.01 + loss/(loss + 100), so trials that still output only blanks are ordered by their CTC loss")
    fidelity_top_k: int = Field(
        0, ge=0, le=20, description=">= 2: also train the top-k trials on the full pool and record the Spearman "
        "correlation of the proxy's ranking and full-training dev WER (costs k full trainings)")
    fidelity_floor: float = Field(0.5, ge=-1, le=1, description="an alert is recorded when that correlation is below")

    @model_validator(mode="after")
    def _rungs(self) -> "SearchConfig":
        if self.grace_period is not None and self.max_epochs is not None and self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) > max_epochs ({self.max_epochs})")
        return self

    def space_path(self) -> Path:
        return project_path(self.space_file)


class GateConfig(Section):
    """Gate thresholds (WERs are fractions, 0.05 = 5 points); the rules are in pipeline.stages.gate.rules.

    ΔWER = candidate − production on the golden set; its interval is the blockwise (speakers, then
    utterances) paired bootstrap at ``confidence``.
    """

    golden_version: str | None = Field(None, description="golden set version; default demo.golden_version")
    max_wer: float = Field(0.40, gt=0, description="absolute ceiling on the candidate's golden-set WER")
    mode: Literal["improve", "non-regression"] = "improve"
    min_improvement: float = Field(
        0.001, ge=0, description="improve: passes when the interval's upper bound <= -min_improvement "
        "(> 0: a copy of production fails)"
    )
    tolerance: float = Field(
        0.005, ge=0, description="non-regression: passes when ΔWER <= +tolerance and the interval's lower bound "
        "<= 0 (no evidence of regression)"
    )
    min_group_utts: int = Field(
        20, ge=1, description="groups with fewer utterances are not checked: reported as too small to tell"
    )
    group_tolerance: float = Field(
        0.03, ge=0, description="per group: fails only when ΔWER > this and its Holm-adjusted interval lies above zero"
    )
    max_group_mde: float = Field(
        0.10, gt=0, le=1, description="a checked group whose minimum detectable effect exceeds this is reported "
        "as too small to tell (it still fails on evidence of regression)"
    )
    power: float = Field(0.8, gt=0.5, lt=1, description="the power at which minimum detectable effects are stated")
    max_group_wer: float | None = Field(None, gt=0, description="optional absolute ceiling for every checked group")
    max_rtf: float = Field(0.5, gt=0, description="real-time factor budget (model compute s / audio s)")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="two-sided confidence of the intervals (before Holm)")
    bootstrap_resamples: int = Field(2000, ge=100, le=100000)
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    calibration_file: str = Field(
        "configs/gate-calibration.json", description="the gate's measured pass rates per golden version "
        "(tests/benchmarks/bench_gate.py writes it; the report's footer quotes it)"
    )
    report_top_utts: int = Field(15, ge=1, description="utterances whose errors changed most, in the report")
    report_leaderboard_rows: int = Field(10, ge=1)


class OrchestrationConfig(Section):
    """Airflow settings the DAG reads at parse time (this file only: no store, Ray, MLflow or DB)."""

    schedule: str = Field("0 3 * * 1", description="cron of the weekly run (UTC)")


class LocalClusterConfig(Section):
    """The local multi-node Ray cluster of ``asr-retune cluster up`` (``ray.address: auto`` uses it)."""

    workers: int = Field(2, ge=1, le=8, description="worker nodes, each carrying the spot resource")
    cpus_per_worker: int | None = Field(None, ge=1, description="default: an equal share of this machine's CPUs")
    gpus_per_worker: int = Field(0, ge=0)
    head_cpus: int = Field(0, ge=0, description="the driver's node; 0 keeps trials and DDP workers off it")
    port: int = Field(6390, ge=1024, le=64000,
                      description="head GCS port; nodes use port .. port+200*(workers+2)-1 (a second block for restarts)")
    dashboard_port: int = Field(8265, ge=1024, le=65535, description="state API and Ray Jobs, on 127.0.0.1")
    object_store_mb: int = Field(512, ge=75, description="per node")
    dir: str = Field(".asr-retune/ray-cluster", description="record (cluster.json) and node logs; relative to the project root")
    temp_dir: str | None = Field(None, description="Ray's temp root for the nodes (keep it short); default /tmp/asr-ray-PORT")
    start_timeout_s: float = Field(90.0, gt=0)


class RayConfig(Section):
    """``address: null`` starts Ray in-process; ``auto`` connects to the local cluster of
    ``asr-retune cluster up`` (in a Ray Job: the job's own cluster); otherwise ``ray://host:10001`` or
    ``host:port``. ``submit: job`` runs each heavy stage as a Ray Job (pipeline.jobs) instead of in the
    calling process."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    spot_resource: str | None = Field(
        "spot", description="custom resource of the spot worker nodes; trials and DDP workers request 0.01 of it (null: no placement)")
    cluster: LocalClusterConfig = LocalClusterConfig()
    submit: Literal["driver", "job"] = Field(
        "driver", description="driver: a heavy stage runs in the calling (Airflow task's) process with ray.init; "
        "job: it is submitted as a Ray Job (asr-retune STAGE --run-id ID) that the caller follows and a retry re-attaches to")
    dashboard_url: str | None = Field(
        None, description="Ray Jobs API (the head's dashboard, http://HOST:8265) for submit: job; null with "
        "address: auto: the local cluster's")
    job_entrypoint: str | None = Field(
        None, description="the command that runs the asr-retune CLI in a job (default: the asr-retune next to this "
        "Python, else asr-retune on the PATH)")

    @model_validator(mode="after")
    def _check_submit(self) -> "RayConfig":
        if self.submit == "job" and self.address is None:
            raise ValueError("submit: job runs stages on a Ray cluster, but address is null (in-process Ray): set "
                             "address: auto (the local cluster of `asr-retune cluster up`, or the job's own cluster "
                             "in production) and, for a remote cluster, dashboard_url")
        if self.dashboard_url is not None and not self.dashboard_url.startswith(("http://", "https://")):
            raise ValueError(f"dashboard_url must be an http(s) URL such as http://HOST:8265, got {self.dashboard_url!r}")
        return self


class MlflowConfig(Section):
    """MLflow tracking and registry: where runs and models are recorded, and the local model cache."""

    tracking_uri: str = "sqlite:///.asr-retune/mlflow.db"
    artifact_root: str = ".asr-retune/mlartifacts"
    registered_model: str = "asr"
    experiment: str = "asr-retune"
    model_cache: str = ".asr-retune/model-cache"
    pip_requirements: list[str] = ["torch==2.11.0", "numpy", "pandas"]
