"""What several benchmarks need: the machine's name, a model from conf/model, the loss's z weight."""

import platform
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
Z_LOSS = 1e-4  # the recipes' z-loss weight, in every benchmarked step


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def conf_model(name: str, vocab: int | None = None, **changes):
    """The OpenELMConfig of conf/model/<name>.yaml; `vocab` fills in a vocabulary the file takes from the
    tokenizer (openelm_tiny's), `changes` override fields."""
    from trainer.model import OpenELMConfig

    values = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    if not isinstance(values.get("vocab_size"), int):
        values["vocab_size"] = vocab
    return OpenELMConfig(**{**values, **changes})
