"""Text generation for a quick look at a model: greedy, temperature and top-k sampling.

A plain loop that re-runs the whole (cropped) sequence for every new token: no
KV cache, so it is slow for long outputs but has no state that could disagree
with the model's forward. Sampling draws from its own seeded torch.Generator,
so a seed gives the same text whatever else used the global RNG.
"""

from typing import Optional

import torch

from data_pipelines.tokenizer import TextTokenizer
from trainer.model import OpenELM


def _next_token(
    logits: torch.Tensor, temperature: float, top_k: Optional[int], greedy: bool, generator: torch.Generator
) -> int:
    """One token id from the last position's logits (vocab,)."""
    if greedy:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth_largest = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: OpenELM,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    greedy: bool = False,
    eos_id: Optional[int] = None,
    seed: Optional[int] = None,
    num_tokens: Optional[int] = None,
) -> list[int]:
    """The new token ids after `prompt_ids` (the prompt itself is not repeated); ends with eos_id if it was drawn.

    The model sees at most its max_context_length latest tokens. seed=None draws a fresh seed.
    num_tokens: the tokenizer's vocabulary size, where the model's embedding has more rows (padded):
    ids from there on are no token and are never drawn.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token (BOS)")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); for the most likely token use greedy=True")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (got {top_k})")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    context_length = model.cfg.max_context_length
    ids, new = list(prompt_ids), []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(max_new_tokens):
                window = torch.tensor([ids[-context_length:]], dtype=torch.long, device=device)
                logits = model(window)[0, -1, :num_tokens].float()
                token = _next_token(logits, temperature, top_k, greedy, generator)
                ids.append(token)
                new.append(token)
                if token == eos_id:
                    break
    finally:
        model.train(was_training)
    return new


def complete(model: OpenELM, tokenizer: TextTokenizer, prompt: str, max_new_tokens: int = 64, **kw) -> str:
    """The text the model writes after `prompt` (encoded with BOS first, as documents are in training).

    Generation stops at the tokenizer's EOS unless eos_id is given; the EOS itself is not returned.
    Other keywords go to generate().
    """
    bos, eos = tokenizer.special_ids()
    kw.setdefault("eos_id", eos)
    kw.setdefault("num_tokens", tokenizer.vocab_size)
    prompt_ids = [bos] + tokenizer.encode_batch([prompt])[0]
    new = generate(model, prompt_ids, max_new_tokens, **kw)
    if new and new[-1] == kw["eos_id"]:
        new = new[:-1]
    # Decode prompt + continuation and cut the prompt's text off: decoding the continuation alone can
    # lose a leading space (SentencePiece drops it at the start of a text). If a character straddles
    # the boundary the prefix no longer matches, and the continuation alone is the best rendering.
    head, full = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + new)
    return full[len(head) :] if full.startswith(head) else tokenizer.decode(new)
