"""Evaluation: token-weighted loss and perplexity on a dataset's val split or on a text file.

The mean is over target tokens, never a mean of batch means, so it does not
depend on how the tokens were batched or split across ranks: each rank sums
its cross-entropy and counts its tokens, and one all-reduce of (sum, count)
gives the exact mean of the whole split. Models load from either a Hugging
Face directory or one of our DeepSpeed checkpoints (run.dir/checkpoints/step_N).
"""

import itertools
import math
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_pipelines.loader import TokenLoader
from data_pipelines.manifest import MANIFEST_NAME, read_manifest
from data_pipelines.packing import Packer, token_dtype
from data_pipelines.sources import holds_txt, read_unit, read_units
from data_pipelines.tokenizer import TextTokenizer, find_tokenizer_file, load_tokenizer
from trainer.checkpoint import complete_ones_beside, latest_checkpoint, read_client_state, require_complete
from trainer.hf import CONFIG_FILE, consolidated_state_dict, load_hf_checkpoint, load_weights
from trainer.model import OpenELM, OpenELMConfig, build_model

# ---------------------------------------------------------------------------- loss


def all_reduce_sums(*values: float) -> list[float]:
    """Sum each value over all ranks (one collective; float64 so token counts and sums stay exact)."""
    # NCCL reduces only CUDA tensors; gloo takes CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


EVAL_CHUNK_TOKENS = 4096  # x 32,000 vocabulary x 4 bytes: 0.5 GB per fp32 copy


def evaluate_loss(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device | str,
    z_loss_weight: float = 0.0,
    distributed: bool = False,
) -> dict:
    """Token-weighted cross-entropy of `batches` ((B, S+1) token ids: inputs [:, :-1], targets [:, 1:]).

    Returns ce_loss, perplexity = exp(ce_loss), loss (ce + z_loss_weight * mean z), tokens and ce_sum.
    `distributed=True` sums over all ranks first (every rank then holds the global figures); under
    ZeRO-3 every rank must also run the same number of batches, as validation_batches gives them.
    """
    was_training = model.training
    model.eval()
    # Sums stay on the device (no sync per batch), in float64 so long evaluations do not lose digits.
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # cross-entropy, z
    tokens = 0
    try:
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(device, non_blocking=True)
                all_logits, all_targets = model(batch[:, :-1]).flatten(0, -2), batch[:, 1:].flatten()
                # In fp32 a slice of tokens at a time: whole, a validation batch's fp32 copy and its
                # log-softmax (1.1B's micro-batch of 16 x 2048: 4 GB each) would sit on top of training's memory.
                for logits, targets in zip(all_logits.split(EVAL_CHUNK_TOKENS), all_targets.split(EVAL_CHUNK_TOKENS)):
                    logits = logits.float()
                    sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
                    if z_loss_weight:
                        sums[1] += torch.logsumexp(logits, dim=-1).pow(2).sum().double()
                tokens += all_targets.numel()
    finally:
        model.train(was_training)
    ce_sum, z_sum = sums.tolist()
    if distributed:
        ce_sum, z_sum, tokens = all_reduce_sums(ce_sum, z_sum, tokens)
        tokens = int(tokens)
    if tokens == 0:
        raise ValueError("evaluate_loss: no tokens to evaluate (empty batches)")
    ce = ce_sum / tokens
    return {
        "ce_loss": ce,
        "perplexity": math.exp(ce),
        "loss": ce + z_loss_weight * z_sum / tokens,
        "tokens": tokens,
        "ce_sum": ce_sum,
    }


# ---------------------------------------------------------------------------- what to evaluate on


def validation_batches(
    data_dir: str | Path,
    rank: int,
    world_size: int,
    batch_size: int,
    max_batches: Optional[int] = None,
    tokenizer_fingerprint: Optional[str] = None,
    dataset_fingerprint: Optional[str] = None,
    whole: bool = False,
) -> Iterator[torch.Tensor]:
    """One unshuffled pass over this rank's share of the `val` split, in (batch_size, seq_len+1) batches.

    Ranks split the samples as the training loader does (rank r takes r, r+W, ...), and every rank
    gets per_rank // batch_size batches (at most max_batches): the same count everywhere, so
    collectives inside the forward (ZeRO-3) stay matched. The few samples this leaves out are the
    price of equal counts; whole=True scores them too, in a last smaller batch (`elmforge eval`: its
    figure then does not depend on the batch size). A tokenizer_fingerprint refuses data tokenized
    with another tokenizer, a dataset_fingerprint a dataset rebuilt since (a training run's, which
    validates again and again).
    """
    loader = TokenLoader(
        data_dir, "val", rank, world_size, batch_size, seed=0, shuffle=False, tokenizer_fingerprint=tokenizer_fingerprint,
        dataset_fingerprint=dataset_fingerprint,
    )
    full, rest = divmod(loader.dataset.per_rank, batch_size)
    if whole and rest:  # the next batch begins with the split's last samples (then the next epoch's)
        batches = itertools.chain(itertools.islice(loader, full), (b[:rest] for b in itertools.islice(loader, 1)))
        return itertools.islice(batches, max_batches)
    if full == 0:
        raise ValueError(
            f"{data_dir}: the val split gives each of {world_size} ranks {rest} samples, "
            f"fewer than one batch of {batch_size}: lower the batch size or prepare more validation data"
        )
    return itertools.islice(loader, full if max_batches is None else min(full, max_batches))


def text_batches(
    paths: str | list[str], tokenizer: TextTokenizer, seq_len: int, batch_size: int, text_field: str = "text",
    separator: str | None = None,
) -> Iterator[torch.Tensor]:
    """Documents of .txt/.jsonl/... files (paths or globs) packed like training data (BOS doc EOS)
    into (B, seq_len+1) batches. `separator` splits .txt files into documents, as a data source's does.

    The tail that does not fill a sample is dropped; the last batch may be smaller. A bad record
    (say, a JSON line without `text_field`) is an error naming it: an eval figure must cover its input.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    # Now: a missing file fails here.
    units = [unit for path in paths for unit in read_units({"path": path, "separator": separator}, 0)]
    if separator is not None and not holds_txt([u.path for u in units]):
        raise ValueError(f"--separator splits .txt files into documents, and {' '.join(paths)} holds none: leave it out")
    bos, eos = tokenizer.special_ids()
    packer = Packer(seq_len, bos, eos, token_dtype(tokenizer.vocab_size))

    def samples() -> Iterator[np.ndarray]:
        for unit in units:
            for record in read_unit(unit, text_field):
                if record.text is None:
                    detail = f": {record.detail}" if record.detail else ""
                    hint = ", or name the field that holds the text (--text-field)" if record.bad == "missing_text_field" else ""
                    raise ValueError(f"{record.origin}: bad record ({record.bad}{detail}); fix it or remove it to evaluate{hint}")
                yield from packer.add(tokenizer.encode_batch([record.text])[0])

    def batches() -> Iterator[torch.Tensor]:
        produced = 0
        stream = samples()
        while rows := list(itertools.islice(stream, batch_size)):
            produced += len(rows)
            yield torch.from_numpy(np.stack(rows).astype(np.int64))
        packer.finish()
        if produced == 0:
            raise ValueError(
                f"{' '.join(paths)}: only {packer.dropped_tail_tokens} tokens (with BOS/EOS), "
                f"too few for one sample of seq_len + 1 = {seq_len + 1}"
            )

    return batches()


# ---------------------------------------------------------------------------- models


def dataset_tokenizer_file(data_dir: Optional[str], fingerprint: Optional[str] = None) -> Optional[tuple[Path, str]]:
    """(file, kind) of a prepared dataset's tokenizer, if the dataset is at data_dir and, given the
    fingerprint a run recorded, still has that tokenizer (a re-prepared one may not)."""
    if not data_dir or not (Path(data_dir) / MANIFEST_NAME).is_file():
        return None
    manifest = read_manifest(data_dir)
    info = manifest.data["tokenizer"]
    if not manifest.tokenizer_path.is_file() or (fingerprint and info["fingerprint"] != fingerprint):
        return None
    return manifest.tokenizer_path, info.get("kind")


def dataset_tokenizer(data_dir: Optional[str], fingerprint: Optional[str] = None) -> Optional[TextTokenizer]:
    """The tokenizer of dataset_tokenizer_file, loaded."""
    found = dataset_tokenizer_file(data_dir, fingerprint)
    return load_tokenizer(*found) if found else None


def load_for_eval(
    path: str | Path, model_cfg: Optional[OpenELMConfig] = None
) -> tuple[OpenELM, Optional[TextTokenizer]]:
    """(model in eval mode, its tokenizer or None) from a Hugging Face directory or a checkpoint step_N.

    model_cfg overrides the config saved in a DeepSpeed checkpoint; a Hugging Face directory
    always uses its own config.json.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist{complete_ones_beside(path)}")
    if (path / "checkpoints").is_dir():
        newest = latest_checkpoint(path / "checkpoints")
        raise FileNotFoundError(f"{path} is a run directory: give one of its checkpoints ({newest or 'none complete yet'}) "
                                "or a Hugging Face export of it (elmforge export)")
    if (path / CONFIG_FILE).is_file():
        if model_cfg is not None:
            raise ValueError(f"{path}: a Hugging Face directory carries its own {CONFIG_FILE}; do not pass model_cfg")
        tokenizer_file = find_tokenizer_file(path)
        return load_hf_checkpoint(path), load_tokenizer(tokenizer_file) if tokenizer_file else None
    if path.is_dir() and any(path.glob("*model_states.pt")):
        require_complete(path)
        client = read_client_state(path)
        model = build_model(model_cfg or OpenELMConfig(**client["model"]))  # the architecture train() built
        load_weights(model, consolidated_state_dict(path), str(path))
        data_dir = client["config"].get("data", {}).get("dir")
        return model.eval(), dataset_tokenizer(data_dir, client.get("tokenizer_fingerprint"))
    raise FileNotFoundError(
        f"{path}: neither a Hugging Face directory ({CONFIG_FILE} + model.safetensors) "
        "nor a DeepSpeed checkpoint directory (run.dir/checkpoints/step_N)"
    )
