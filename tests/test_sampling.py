"""Sampling: greedy is argmax, seeds reproduce, top-k=1 is greedy, EOS stops, long outputs crop the context."""

import pytest
import torch

from corpus import make_documents
from data_pipelines.tokenizer import train_bpe
from test_hf import random_model
from test_model import small_config
from trainer.sampling import complete, generate

PROMPT = [1, 5, 17, 42, 8]


@pytest.fixture(scope="module")
def model():
    return random_model(small_config())  # random norm weights too: logits far from uniform


def argmax_loop(model, prompt: list[int], n: int, context: int | None = None) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            window = ids[-context:] if context else ids
            ids.append(int(model(torch.tensor([window]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_is_the_argmax_loop(model):
    assert generate(model, PROMPT, 8, greedy=True) == argmax_loop(model, PROMPT, 8)


def test_the_same_seed_gives_the_same_sample_and_other_seeds_differ(model):
    a = generate(model, PROMPT, 12, seed=3)
    assert len(a) == 12 and all(0 <= t < 97 for t in a)
    assert generate(model, PROMPT, 12, seed=3) == a
    torch.manual_seed(123)  # the global RNG plays no part
    assert generate(model, PROMPT, 12, seed=3) == a
    others = {tuple(generate(model, PROMPT, 12, seed=s)) for s in range(4, 8)}
    assert tuple(a) not in others and len(others) > 1


def test_top_k_of_one_is_greedy(model):
    assert generate(model, PROMPT, 8, top_k=1, seed=0, temperature=0.7) == generate(model, PROMPT, 8, greedy=True)


def test_top_k_only_draws_among_the_k_most_likely(model):
    with torch.no_grad():
        top3 = set(model(torch.tensor([PROMPT]))[0, -1].topk(3).indices.tolist())
    firsts = {generate(model, PROMPT, 1, top_k=3, temperature=5.0, seed=s)[0] for s in range(30)}
    assert firsts <= top3 and len(firsts) > 1


def test_generation_stops_right_after_eos(model):
    greedy = generate(model, PROMPT, 8, greedy=True)
    eos = greedy[2]
    first_eos = greedy.index(eos)  # the token may occur earlier too
    assert generate(model, PROMPT, 8, greedy=True, eos_id=eos) == greedy[: first_eos + 1]


def test_long_generation_crops_to_the_context_length():
    cfg = small_config(max_context_length=8, rope_max_length=16)
    model = random_model(cfg)
    out = generate(model, PROMPT, 20, greedy=True)  # 25 tokens in all, past rope_max_length too
    assert out == argmax_loop(model, PROMPT, 20, context=8)


def test_bad_arguments_are_refused(model):
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate(model, PROMPT, 3, temperature=0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        generate(model, PROMPT, 3, top_k=0)


def test_complete_decodes_only_the_continuation():
    tokenizer = train_bpe(make_documents(50), vocab_size=300)
    model = random_model(small_config(vocab_size=300))
    bos, eos = tokenizer.special_ids()
    prompt = "select the row"
    prompt_ids = [bos] + tokenizer.encode_batch([prompt])[0]
    new = generate(model, prompt_ids, 10, greedy=True, eos_id=eos)
    text = complete(model, tokenizer, prompt, max_new_tokens=10, greedy=True)
    assert text == tokenizer.decode([t for t in new if t != eos])
    assert not text.startswith(prompt)


def test_rows_of_a_padded_embedding_past_the_tokenizers_vocabulary_are_never_drawn(model):
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT]))[0, -1]
    top = int(logits.argmax())  # 97 rows: say the tokenizer has fewer tokens, and the most likely is not one
    assert generate(model, PROMPT, 1, greedy=True)[0] == top
    assert generate(model, PROMPT, 1, greedy=True, num_tokens=top)[0] == int(logits[:top].argmax())
    drawn = {t for s in range(20) for t in generate(model, PROMPT, 6, temperature=5.0, seed=s, num_tokens=10)}
    assert drawn <= set(range(10)) and len(drawn) > 1
