"""The typed schema every composed config is checked against.

Hydra merges conf/*.yaml and command-line overrides onto these dataclasses, so a
misspelt key or a value of the wrong type fails at composition, naming the key.

Values live in conf/*.yaml, types here: a field that config.yaml, or every option of its group, sets
is MISSING here. A field keeps a default only where no yaml sets it, where only some options of its
group set it (an optional override: deepspeed.offload_params, data.shard_bytes) or in a list entry
(data.sources); tests/test_config.py checks this. The model group is trainer/model_config.py's own.
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
    separator: Optional[str] = None  # .txt files: documents end at it ("<|endoftext|>", "\n\n"); null: one per file
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
    # A data option (conf/data/<name>.yaml, or the user's own) needs only name and sources.
    seq_len: int = 128
    val_fraction: float = 0.02
    samples_per_shard: int = 2048
    shard_bytes: Optional[int] = None  # when set, overrides samples_per_shard
    filters: FilterConfig = field(default_factory=FilterConfig)
    on_bad_record: OnBadRecord = OnBadRecord.skip
    workers: Optional[int] = None  # tokenizer actors; null = Ray CPUs - 1, 0 = in-process without Ray
    dir: Optional[str] = None  # null: ${storage_path}/data/${data.name}


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = MISSING
    vocab_size: int = MISSING
    path: Optional[str] = MISSING
    max_train_documents: Optional[int] = None  # BPE: train on the first N documents


@dataclass
class FaultConfig:
    """Fault injection, for tests of recovery; never set in real runs."""

    kill_at_step: Optional[int] = None  # this rank's process dies at the start of the step, once per run
    kill_in_save_at_step: Optional[int] = None  # ... dies saving this step's checkpoint, before it is complete
    kill_rank: int = 0
    sigterm_at_step: Optional[int] = None  # every rank receives SIGTERM after this step, once per run
    nonfinite_at_steps: list[int] = field(default_factory=list)  # the loss becomes NaN on nonfinite_rank
    nonfinite_rank: int = 0


@dataclass
class TrainConfig:
    seed: int = MISSING
    max_steps: int = MISSING
    micro_batch_size: int = MISSING
    grad_accum_steps: Optional[int] = MISSING
    global_batch_tokens: Optional[int] = MISSING
    precision: Precision = MISSING
    lr: float = MISSING
    warmup_steps: int = MISSING
    warmup_init_lr: float = MISSING
    min_lr_ratio: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    weight_decay: float = MISSING
    grad_clip: float = MISSING
    z_loss_weight: float = MISSING
    log_every: int = MISSING
    loader_workers: int = MISSING
    checkpoint_every: Optional[int] = MISSING
    keep_checkpoints: int = MISSING
    eval_every: Optional[int] = MISSING
    eval_batches: int = MISSING
    max_skipped_in_row: int = MISSING
    init_from: Optional[str] = MISSING
    compile: bool = MISSING
    gc_every: int = MISSING
    faults: FaultConfig = field(default_factory=FaultConfig)


@dataclass
class DeepSpeedConfig:
    stage: int = MISSING
    offload_optimizer: bool = False  # optimizer state in CPU memory (stage 1-3)
    offload_params: bool = False  # parameters in CPU memory (stage 3)
    communication_data_type: Optional[str] = None  # e.g. fp32: reduce bf16 gradients in fp32


class Launcher(Enum):
    ray = "ray"
    local = "local"


@dataclass
class ClusterConfig:
    launcher: Launcher = MISSING
    address: Optional[str] = MISSING
    num_workers: int = MISSING
    min_workers: Optional[int] = MISSING
    cpus_per_worker: float = MISSING
    use_gpu: bool = MISSING
    num_cpus: Optional[int] = MISSING
    dashboard: bool = MISSING
    max_failures: int = MISSING


@dataclass
class LoggerConfig:
    wandb: bool = MISSING
    mode: WandbMode = MISSING
    project: str = MISSING
    entity: Optional[str] = MISSING
    group: Optional[str] = MISSING
    tags: list[str] = MISSING


@dataclass
class RunConfig:
    name: Optional[str] = MISSING
    dir: Optional[str] = MISSING


@dataclass
class SubmitConfig:
    address: Optional[str] = MISSING
    working_dir: str = MISSING
    excludes: list[str] = MISSING
    entrypoint_num_cpus: float = MISSING


@dataclass
class SweepConfig:
    name: str = MISSING
    metric: str = MISSING
    mode: str = MISSING
    num_samples: int = MISSING
    max_concurrent_trials: int = MISSING
    grace_period: int = MISSING
    reduction_factor: int = MISSING
    trial_cpus: float = 0.1  # the trial function only drives its Ray Train workers (Ray needs > 0)
    seed: int = 0
    space: dict[str, Any] = MISSING


@dataclass
class PrepareConfig:
    dry_run: bool = MISSING
    verify: bool = MISSING
    force: bool = MISSING


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
    storage_path: str = MISSING
