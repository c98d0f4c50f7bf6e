"""Hugging Face interop: our OpenELM <-> Apple's published layout (config.json + model.safetensors).

An exported directory loads with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
through our own remote code (trainer/hf_modeling), copied beside the weights. Parameter names
already match the layout, so export and import copy tensors without renaming. DeepSpeed
checkpoints (any ZeRO stage) are consolidated to full fp32 weights and, like the OpenELM
release, the last few can be averaged before export.
"""

import contextlib
import io
import json
import math
import os
import pickle
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data_pipelines.swap_dir import real_destination, swap_into_place
from data_pipelines.tokenizer import BOS, EOS, UNK, find_tokenizer_file, load_tokenizer
from trainer.checkpoint import unreadable
from trainer.layer_scaling import LayerPlan, make_divisible, per_layer_multipliers, scaled_layer_plan
from trainer.model import OpenELM, OpenELMConfig, build_model
from trainer.optim import decayed

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation_config.json"
REMOTE_CODE_DIR = Path(__file__).parent / "hf_modeling"
REMOTE_CODE_FILES = ("configuration_openelm.py", "modeling_openelm.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
EXPORT_FILES = {  # what an export holds
    CONFIG_FILE, WEIGHTS_FILE, GENERATION_FILE, *REMOTE_CODE_FILES, *TOKENIZER_FILES, "__pycache__"}

# What our model computes; a config.json asking for anything else cannot be loaded faithfully.
# (hf_modeling/modeling_openelm.py keeps its own copy: remote code may not import elmforge.)
ARCHITECTURE = {
    "ffn_with_glu": True,
    "activation_fn_name": "swish",
    "normalization_layer_name": "rms_norm",
    "normalize_qk_projections": True,
    "share_input_output_layers": True,
}


# ---------------------------------------------------------------------------- config.json


def _ffn_divisor(model_dim: int, ffn_dims: tuple[int, ...], preferred: int) -> int:
    """A divisor with which make_divisible(ffn_dims[i] / model_dim * model_dim, divisor) gives back ffn_dims[i].

    Formula-made widths are multiples of `preferred`; explicit ones may not be, and then their gcd works
    (make_divisible leaves a multiple of its divisor unchanged).
    """
    for divisor in (preferred, math.gcd(*ffn_dims)):
        if all(make_divisible(f / model_dim * model_dim, divisor) == f for f in ffn_dims):
            return divisor
    raise ValueError(f"no ffn_dim_divisor reproduces the FFN widths {list(ffn_dims)}")


def _multipliers(cfg: OpenELMConfig, plan: LayerPlan, divisor: int) -> dict:
    """qkv_multipliers and ffn_multipliers in the release's form, (min, max) and each layer's rounded share,
    where OpenELM's formula gives `plan` (an imported release included: Apple's config class reads no other
    qkv form); otherwise each layer's actual share, which our remote code reads as well."""
    n, d = cfg.num_layers, cfg.model_dim
    formula = scaled_layer_plan(n, d, cfg.head_dim, cfg.num_gqa_groups, tuple(cfg.qkv_multipliers),
                                tuple(cfg.ffn_multipliers), divisor)
    same_heads = (formula.num_query_heads, formula.num_kv_heads) == (plan.num_query_heads, plan.num_kv_heads)
    return {
        "qkv_multipliers": list(cfg.qkv_multipliers) if same_heads else [q * cfg.head_dim / d for q in plan.num_query_heads],
        "ffn_multipliers": (
            per_layer_multipliers(*cfg.ffn_multipliers, n) if formula.ffn_dims == plan.ffn_dims else [f / d for f in plan.ffn_dims]
        ),
    }


def hf_config_dict(cfg: OpenELMConfig, plan: LayerPlan, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for `cfg` with the per-layer lists of `plan` (Apple's keys, our remote code)."""
    divisor = _ffn_divisor(cfg.model_dim, plan.ffn_dims, cfg.ffn_dim_divisor)
    return {
        "model_type": "openelm",
        "architectures": ["OpenELMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_openelm.OpenELMConfig",
            "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM",
        },
        "num_transformer_layers": cfg.num_layers,
        "model_dim": cfg.model_dim,
        "head_dim": cfg.head_dim,
        "num_gqa_groups": cfg.num_gqa_groups,
        "num_query_heads": list(plan.num_query_heads),
        "num_kv_heads": list(plan.num_kv_heads),
        **_multipliers(cfg, plan, divisor),
        "ffn_dim_divisor": divisor,
        **ARCHITECTURE,
        "rope_freq_constant": int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
        "rope_max_length": cfg.rope_max_length,
        "max_context_length": cfg.max_context_length,
        "rms_norm_eps": cfg.norm_eps,
        "vocab_size": cfg.vocab_size,
        "bos_token_id": 1,  # LLaMA's, as released; save_hf_checkpoint writes its tokenizer's own
        "eos_token_id": 2,
        "initializer_range": 0.02,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,  # generate() keeps a KV cache
    }


def _require(hf: dict, key: str, source: str):
    if key not in hf:
        raise ValueError(f"{source}: missing key {key!r}")
    return hf[key]


def _per_layer(values: list, num_layers: int, key: str, source: str) -> list:
    if not isinstance(values, list) or len(values) != num_layers:
        raise ValueError(f"{source}: {key} must list one value per layer ({num_layers}), got {values!r}")
    return values


def config_from_hf(hf: dict, source: str = CONFIG_FILE) -> OpenELMConfig:
    """Our OpenELMConfig from a config.json dict (ours or Apple's): explicit per-layer heads and FFN widths."""
    for key, value in ARCHITECTURE.items():
        if hf.get(key, value) != value:
            raise ValueError(f"{source}: {key}={hf[key]!r} is not supported (only {value!r})")
    n, d = _require(hf, "num_transformer_layers", source), _require(hf, "model_dim", source)
    if _require(hf, "head_dim", source) % 2:
        raise ValueError(f"{source}: head_dim={hf['head_dim']} is odd; rotary embeddings turn pairs of dimensions")
    divisor = _require(hf, "ffn_dim_divisor", source)
    ffn_multipliers = _per_layer(_require(hf, "ffn_multipliers", source), n, "ffn_multipliers", source)
    qkv = hf.get("qkv_multipliers") or [0.5, 1.0]  # informational once the heads are listed per layer
    if isinstance(qkv, (int, float)):  # Apple's config class takes one number for every layer too
        qkv = [qkv, qkv]
    return OpenELMConfig(
        name=hf.get("_name_or_path") or "openelm_hf",
        num_layers=n,
        model_dim=d,
        head_dim=_require(hf, "head_dim", source),
        num_gqa_groups=_require(hf, "num_gqa_groups", source),
        qkv_multipliers=[qkv[0], qkv[-1]],
        ffn_multipliers=[ffn_multipliers[0], ffn_multipliers[-1]],
        ffn_dim_divisor=divisor,
        vocab_size=_require(hf, "vocab_size", source),
        max_context_length=hf.get("max_context_length", 2048),
        rope_theta=float(hf.get("rope_freq_constant", 10000)),
        rope_max_length=hf.get("rope_max_length", 4096),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        num_query_heads=_per_layer(_require(hf, "num_query_heads", source), n, "num_query_heads", source),
        num_kv_heads=_per_layer(_require(hf, "num_kv_heads", source), n, "num_kv_heads", source),
        ffn_dims=[make_divisible(m * d, divisor) for m in ffn_multipliers],
    )


# ---------------------------------------------------------------------------- weights


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state_dict` into `model`; any missing, unexpected or wrong-shaped tensor is an error naming it."""
    expected = model.state_dict()
    problems = [f"missing tensor {k!r}" for k in expected if k not in state_dict]
    problems += [f"unexpected tensor {k!r}" for k in state_dict if k not in expected]
    problems += [
        f"tensor {k!r} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def save_hf_checkpoint(
    model: OpenELM, path: str | Path, tokenizer_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> Path:
    """Write config.json, model.safetensors, the remote code and (optionally) the tokenizer as the directory
    `path`: new, or replacing a previous export whole (a tokenizer it held goes with it). Anything else
    there is refused, and a failure midway leaves `path` as it was."""
    path = Path(path)
    _check_replaceable(path)
    target = real_destination(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        _write_export(model, partial, tokenizer_dir, dtype)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    swap_into_place(partial, target)
    return path


def _check_replaceable(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a directory; export to a new or empty directory")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in EXPORT_FILES)
    config = path / CONFIG_FILE
    if config.is_file() and not _is_openelm_config(config):
        foreign.insert(0, f"{CONFIG_FILE} (not an OpenELM config)")
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{path} holds files that are not a Hugging Face OpenELM export ({shown}): export to "
                              "a new or empty directory, or remove them")


def _is_openelm_config(config: Path) -> bool:
    try:
        return json.loads(config.read_text()).get("model_type") == "openelm"
    except (ValueError, AttributeError):
        return False


def _write_export(model: OpenELM, path: Path, tokenizer_dir: str | Path | None, dtype: torch.dtype) -> None:
    config = hf_config_dict(model.cfg, model.plan, dtype)
    if tokenizer_dir is not None:  # generate() stops at eos_token_id: it must be this tokenizer's
        ids = save_tokenizer(tokenizer_dir, path, config["max_context_length"])
        config["bos_token_id"], config["eos_token_id"] = ids
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    # generate()'s defaults, as save_pretrained writes them. No pad token: batches need an attention_mask.
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "use_cache")}
    (path / GENERATION_FILE).write_text(json.dumps(generation, indent=2) + "\n")
    # The tied head is the embedding itself, so the state dict holds it once.
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    # safetensors writes 0600; on shared storage the weights should be as readable as the rest (the umask's).
    os.chmod(path / WEIGHTS_FILE, (path / CONFIG_FILE).stat().st_mode & 0o777)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(REMOTE_CODE_DIR / name, path / name)


def load_hf_checkpoint(path: str | Path) -> OpenELM:
    """Our OpenELM (fp32, eval mode) from a Hugging Face directory: ours or Apple's release."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not weights_path.is_file() and (path / f"{WEIGHTS_FILE}.index.json").is_file():
        raise ValueError(f"{path}: its weights are split into shards ({WEIGHTS_FILE}.index.json), which elmforge does "
                         "not read: save them as one file first (transformers: model.save_pretrained(dir, "
                         "max_shard_size='100GB'))")
    for f in (config_path, weights_path):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found (expected a Hugging Face OpenELM directory)")
    model = build_model(config_from_hf(json.loads(config_path.read_text()), str(config_path)))
    load_weights(model, load_file(str(weights_path)), str(weights_path))
    return model.eval()


# ---------------------------------------------------------------------------- tokenizer


def _save_framing_with_bos(source: Path, copy: Path) -> None:
    """The tokenizer.json with a post-processor that puts <s> first, as training framed every document:
    transformers' tokenizer(text) then gives the model what it expects, as LLaMA's does (transformers 5
    drops an add_bos_token setting beside a tokenizer.json). The ids of the text itself are unchanged,
    and elmforge encodes without special tokens, so the file still tokenizes data alike."""
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_file(str(source))
    bos = tokenizer.token_to_id(BOS)
    if bos is None:  # not one of ours: prepare requires <s>
        shutil.copyfile(source, copy)
        return
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)])
    tokenizer.save(str(copy))


def save_tokenizer(tokenizer_dir: str | Path, out: str | Path, max_length: int) -> tuple[int, int]:
    """The tokenizer file (tokenizer.json, or a SentencePiece tokenizer.model such as LLaMA's) plus the
    small files AutoTokenizer needs to load it offline; returns its (BOS, EOS) ids."""
    source = Path(tokenizer_dir)
    if source.is_dir():
        source = find_tokenizer_file(source) or source
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no tokenizer.json or tokenizer.model to export")
    out = Path(out)
    sentencepiece = source.suffix == ".model"
    copy = out / ("tokenizer.model" if sentencepiece else "tokenizer.json")
    if sentencepiece:
        shutil.copyfile(source, copy)
    else:
        _save_framing_with_bos(source, copy)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    tokenizer_class = "LlamaTokenizer" if sentencepiece else "PreTrainedTokenizerFast"
    tokenizer_config = {"tokenizer_class": tokenizer_class, "model_max_length": max_length, **special}
    if sentencepiece:  # as LLaMA's own: the model trained on <s>-framed text (transformers 5 adds none unasked)
        tokenizer_config.update(add_bos_token=True, add_eos_token=False)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return load_tokenizer(copy).special_ids()


# ---------------------------------------------------------------------------- DeepSpeed checkpoints


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of one DeepSpeed checkpoint `.../checkpoints/step_N` (any ZeRO stage, any world size)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"{checkpoint_dir}: no such checkpoint directory")
    try:
        return _consolidated(checkpoint_dir)
    except (RuntimeError, EOFError, pickle.UnpicklingError, KeyError) as e:  # a truncated or damaged file
        raise unreadable(checkpoint_dir, e) from e


def _consolidated(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    if any(checkpoint_dir.glob("*_optim_states.pt")):
        # ZeRO 1-3 keep the fp32 master weights in the (sharded) optimizer states; DeepSpeed's own tool
        # merges them. Those files hold pickled DeepSpeed objects: it loads them with weights_only=False.
        if "deepspeed" not in sys.modules:  # merging needs no accelerator; unset, DeepSpeed probes and warns
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # Its progress prints and bar say nothing our own lines do not; errors still raise.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir.parent), tag=checkpoint_dir.name)
    else:
        state = _stage0_state_dict(checkpoint_dir / "mp_rank_00_model_states.pt")
    return {k: v.float() for k, v in state.items()}


def _stage0_state_dict(model_states: Path) -> dict[str, torch.Tensor]:
    """ZeRO-0 saves the whole module in one file under "module"; in bf16 those are the rounded weights,
    and the fp32 master weights are the optimizer's, one list per parameter group."""
    if not model_states.is_file():
        raise FileNotFoundError(f"{model_states}: not found (not a DeepSpeed checkpoint?)")
    # Tensors and plain containers only (optimizer and scheduler state dicts, our client state): no unpickling.
    states = torch.load(model_states, map_location="cpu", weights_only=True)
    module, masters = states["module"], (states.get("optimizer") or {}).get("fp32_groups")
    if not masters:
        return module
    names = [n for n in module if n not in set(states.get("buffer_names") or ())]
    names = [n for n in names if decayed(module[n])] + [n for n in names if not decayed(module[n])]  # optim.param_groups
    flat = [t for group in masters for t in group]
    if [tuple(module[n].shape) for n in names] != [tuple(t.shape) for t in flat]:
        raise ValueError(f"{model_states}: the optimizer's fp32 weights do not match the module's parameters")
    return {**module, **dict(zip(names, flat))}


def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Elementwise mean (accumulated in fp64, returned in fp32) of state dicts with the same keys and shapes."""
    if not state_dicts:
        raise ValueError("average_state_dicts: no state dicts given")
    first = state_dicts[0]
    for i, other in enumerate(state_dicts[1:], start=1):
        if other.keys() != first.keys():
            raise ValueError(f"state dict {i} has different keys: {sorted(other.keys() ^ first.keys())}")
        for k, v in other.items():
            if v.shape != first[k].shape:
                raise ValueError(f"state dict {i}: {k!r} has shape {tuple(v.shape)}, state dict 0 {tuple(first[k].shape)}")
    return {k: (sum(sd[k].double() for sd in state_dicts) / len(state_dicts)).float() for k in first}


def export_checkpoints(
    checkpoint_dirs: list[str | Path],
    out_dir: str | Path,
    model_cfg: OpenELMConfig,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Average the given DeepSpeed checkpoints (the release averages the last 5) and write a HF directory."""
    if not checkpoint_dirs:
        raise ValueError("export_checkpoints: no checkpoints given")
    state = average_state_dicts([consolidated_state_dict(d) for d in checkpoint_dirs])
    model = build_model(model_cfg)
    load_weights(model, state, ", ".join(map(str, checkpoint_dirs)))
    return save_hf_checkpoint(model, out_dir, tokenizer_dir)
