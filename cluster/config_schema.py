"""The typed schema every composed config is checked against.

Hydra merges conf/*.yaml and command-line overrides onto these dataclasses, so a
misspelt key or a value of the wrong type fails at composition, naming the key.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING

from trainer.model_config import OpenELMConfig


class Precision(Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class TokenizerKind(Enum):
    bpe = "bpe"
    file = "file"
    sentencepiece = "sentencepiece"


class OnBadRecord(Enum):
    skip = "skip"
    error = "error"


class WandbMode(Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class SourceConfig:
    """Local files (`path`, a glob) or a Hugging Face dataset (`hf` id or local dataset directory)."""

    name: Optional[str] = None
    path: Optional[str] = None
    hf: Optional[str] = None
    hf_config: Optional[str] = None
    hf_split: str = "train"
    hf_data_files: Optional[str] = None  # glob of files within the dataset, to pick a subset
    text_field: str = "text"
    weight: float = 1.0  # share of output tokens, normalised over sources
    repeat: bool = False  # may be read again when it runs out before its share


@dataclass
class FilterConfig:
    min_chars: int = 0  # after lower-casing and stripping punctuation (OpenELM: 200)
    min_tokens: int = 0  # OpenELM: 256
    dedup: bool = True


@dataclass
class DataConfig:
    name: str = MISSING
    sources: list[SourceConfig] = MISSING
    target_tokens: Optional[int] = None
    seq_len: int = 128
    val_fraction: float = 0.02
    samples_per_shard: int = 2048
    shard_bytes: Optional[int] = None  # when set, overrides samples_per_shard
    filters: FilterConfig = field(default_factory=FilterConfig)
    on_bad_record: OnBadRecord = OnBadRecord.skip
    workers: Optional[int] = None  # tokenizer actors; null = Ray CPUs - 1, 0 = in-process without Ray
    dir: Optional[str] = None


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = TokenizerKind.bpe
    vocab_size: int = 4096
    path: Optional[str] = None
    max_train_documents: Optional[int] = None  # BPE: train on the first N documents


@dataclass
class FaultConfig:
    """Fault injection, for tests of recovery; never set in real runs."""

    kill_at_step: Optional[int] = None  # this rank's process dies at the start of the step, once per run
    kill_rank: int = 0
    sigterm_at_step: Optional[int] = None  # every rank receives SIGTERM after this step, once per run
    nonfinite_at_steps: list[int] = field(default_factory=list)  # the loss becomes NaN on nonfinite_rank
    nonfinite_rank: int = 0


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 120
    micro_batch_size: int = 8
    grad_accum_steps: Optional[int] = None  # null: from global_batch_tokens, else 1
    global_batch_tokens: Optional[int] = None  # tokens per optimizer step over all ranks
    precision: Precision = Precision.fp32
    lr: float = 3e-3
    warmup_steps: int = 10
    warmup_init_lr: float = 1e-6
    min_lr_ratio: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    z_loss_weight: float = 1e-4
    log_every: int = 10
    loader_workers: int = 1
    checkpoint_every: Optional[int] = None  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 3  # the newest K complete checkpoints are kept
    eval_every: Optional[int] = None  # validation loss every N steps (and at the end)
    eval_batches: int = 20  # per rank, from the val split
    max_skipped_in_row: int = 3  # non-finite steps in a row before training stops
    init_from: Optional[str] = None  # a Hugging Face OpenELM directory to start from
    compile: bool = False  # torch.compile the model and the loss
    gc_every: int = 50  # Python garbage collection every N steps on every rank at once; 0: Python's automatic one
    faults: FaultConfig = field(default_factory=FaultConfig)


@dataclass
class DeepSpeedConfig:
    stage: int = 2
    offload_optimizer: bool = False  # optimizer state in CPU memory (stage 1-3)
    offload_params: bool = False  # parameters in CPU memory (stage 3)
    communication_data_type: Optional[str] = None  # e.g. fp32: reduce bf16 gradients in fp32


class Launcher(Enum):
    ray = "ray"
    local = "local"


@dataclass
class ClusterConfig:
    launcher: Launcher = Launcher.ray  # local: this process, or each torchrun process, runs the loop
    address: Optional[str] = None
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    num_cpus: Optional[int] = 4
    dashboard: bool = False  # an embedded Ray's dashboard (a cluster has its own)
    max_failures: int = 0  # worker-group restarts Ray Train may make; each resumes from the newest checkpoint


@dataclass
class LoggerConfig:
    wandb: bool = True
    mode: WandbMode = WandbMode.offline
    project: str = "elmforge"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    name: Optional[str] = None
    dir: Optional[str] = None


@dataclass
class SubmitConfig:
    address: Optional[str] = None  # Ray Jobs API, http://<head>:8265 (or RAY_ADDRESS)
    working_dir: str = "."  # uploaded with the job, less `excludes` (gitignore syntax: "/x" is top-level only)
    excludes: list[str] = field(
        default_factory=lambda: ["/.venv", "/data", "/outputs", "/sweeps", "/wandb", "/.whl", ".git", "__pycache__",
                                 ".pytest_cache"]
    )
    entrypoint_num_cpus: float = 0.0  # the driver only coordinates the workers


@dataclass
class SweepConfig:
    name: str = MISSING
    metric: str = "val_loss"
    mode: str = "min"
    num_samples: int = 4
    max_concurrent_trials: int = 2
    grace_period: int = 2  # ASHA: steps before a trial can be stopped
    reduction_factor: int = 2
    trial_cpus: float = 0.1  # the trial function only drives its Ray Train workers (Ray needs > 0)
    seed: int = 0
    # config key -> {type: choice, values: [...]} | {type: uniform|loguniform, low: .., high: ..}
    space: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrepareConfig:
    dry_run: bool = False
    verify: bool = False
    force: bool = False


@dataclass
class ElmConfig:
    model: OpenELMConfig = field(default_factory=OpenELMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    sweep: Optional[SweepConfig] = None
    storage_path: str = "."
