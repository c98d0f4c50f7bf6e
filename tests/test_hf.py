"""Hugging Face interop: export/import of our layout, the shipped remote code, DeepSpeed checkpoint consolidation."""

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: never reach for the hub

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

from cluster.config import compose_config  # noqa: E402
from data_pipelines.tokenizer import load_tokenizer  # noqa: E402
from test_model import released, small_config  # noqa: E402
from test_train_loop import SMALL_MODEL  # noqa: E402
from trainer.hf import (  # noqa: E402
    average_state_dicts,
    config_from_hf,
    consolidated_state_dict,
    export_checkpoints,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from trainer.loss import lm_loss  # noqa: E402
from trainer.model import OpenELMConfig, build_model  # noqa: E402
from trainer.train_loop import train  # noqa: E402

CONFIGS = {
    # The formula gives 2, 4, 4 query heads and FFN 32, 144, 256.
    "formula": small_config(),
    # Explicit lists; FFN widths that are not multiples of ffn_dim_divisor=16 must still round-trip.
    "explicit": small_config(num_query_heads=[2, 4, 6], num_kv_heads=[1, 2, 3], ffn_dims=[24, 48, 80]),
}


def random_model(cfg: OpenELMConfig, seed: int = 0):
    """A model with random norm weights too, so a misplaced or skipped norm cannot hide behind weight = 1."""
    model = build_model(cfg, seed=seed).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model


def tokens_for(cfg: OpenELMConfig, batch: int = 2, seq: int = 13) -> torch.Tensor:
    return torch.randint(3, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


@pytest.fixture
def exported(tmp_path):
    model = random_model(CONFIGS["explicit"])
    return model, save_hf_checkpoint(model, tmp_path / "hf")


# ---------------------------------------------------------------------------- (a) our export and import


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_then_load_gives_identical_logits(name, tmp_path):
    model = random_model(CONFIGS[name])
    out = save_hf_checkpoint(model, tmp_path / "hf")
    loaded = load_hf_checkpoint(out)
    assert loaded.plan == model.plan
    tokens = tokens_for(model.cfg)
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


def test_export_writes_the_published_layout(exported):
    model, out = exported
    config = json.loads((out / "config.json").read_text())
    plan = model.plan
    assert config["model_type"] == "openelm" and config["architectures"] == ["OpenELMForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_openelm.OpenELMForCausalLM"
    assert config["num_query_heads"] == [2, 4, 6] and config["num_kv_heads"] == [1, 2, 3]
    assert config["num_transformer_layers"] == 3 and config["vocab_size"] == 97
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (1, 2, "float32")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "use_cache": True}
    assert config_from_hf(config).layer_plan() == plan
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(model.state_dict())  # the tied head is stored once, as the embedding
    assert "transformer.layers.2.attn.qkv_proj.weight" in weights
    assert (out / "configuration_openelm.py").is_file() and (out / "modeling_openelm.py").is_file()
    modes = {p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes == {(out / "config.json").stat().st_mode & 0o777}  # the weights as readable as the rest


def test_an_export_replaces_a_previous_one_whole_and_touches_nothing_else(tiny_dataset, tmp_path):
    model = random_model(small_config(vocab_size=300))
    out = save_hf_checkpoint(model, tmp_path / "hf", tokenizer_dir=tiny_dataset)
    assert (out / "tokenizer.json").is_file()
    save_hf_checkpoint(model, out)  # again, without a tokenizer: the old one must not stay behind
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # A failure midway (here: no tokenizer where one was promised) leaves the previous export as it was.
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        save_hf_checkpoint(random_model(small_config(vocab_size=300), seed=1), out, tokenizer_dir=tmp_path / "none")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no partial directory left

    # Anything that is not an export is refused and left alone.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"x": 1}')
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"config.json \(not an OpenELM config\), notes.txt\): export to a new"):
        save_hf_checkpoint(model, mine)
    assert (mine / "config.json").read_text() == '{"x": 1}' and (mine / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "notes.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        save_hf_checkpoint(model, tmp_path / "file")

    # A link to an export elsewhere (a larger disk): the export there is replaced, the link stays.
    (tmp_path / "elsewhere").mkdir()
    shutil.move(out, tmp_path / "elsewhere" / "hf")
    (tmp_path / "linked").symlink_to(tmp_path / "elsewhere" / "hf", target_is_directory=True)
    assert save_hf_checkpoint(model, tmp_path / "linked", tokenizer_dir=tiny_dataset) == tmp_path / "linked"
    assert (tmp_path / "linked").is_symlink() and (tmp_path / "elsewhere" / "hf" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == ["hf"]


# ---------------------------------------------------------------------------- (b) transformers remote code


def test_transformers_loads_the_export_with_the_same_logits_and_loss(exported):
    model, out = exported
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokens = tokens_for(model.cfg)
    ours = logits(model, tokens)
    with torch.no_grad():
        result = hf(tokens, labels=tokens)
    torch.testing.assert_close(result.logits, ours, atol=1e-5, rtol=1e-5)
    _, ce = lm_loss(ours[:, :-1], tokens[:, 1:], 0.0)
    torch.testing.assert_close(result.loss, ce, atol=1e-5, rtol=1e-5)


def greedy_continuation(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The prompt and its greedy continuation by our model, each step re-reading the whole sequence."""
    ids = prompt
    for _ in range(new_tokens):
        ids = torch.cat([ids, logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def load_export(out):
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_matches_our_argmax_loop(exported, use_cache):
    model, out = exported
    prompt = tokens_for(model.cfg, batch=1, seq=6)
    generated = load_export(out).generate(prompt, max_new_tokens=8, do_sample=False, use_cache=use_cache)
    assert torch.equal(generated, greedy_continuation(model, prompt, 8))


def test_left_padding_does_not_change_a_prompts_logits(exported):
    model, out = exported
    hf = load_export(out)
    prompt = tokens_for(model.cfg, batch=1, seq=7)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(prompt)], dim=1)
    with torch.no_grad():
        alone, with_padding = hf(prompt).logits, hf(padded, attention_mask=mask).logits
    torch.testing.assert_close(with_padding[:, 3:], alone, atol=1e-5, rtol=1e-5)


def test_the_kv_cache_gives_the_logits_of_the_whole_sequence(exported):
    # A left-padded batch fed in three pieces, each reading the keys and values the pieces before left.
    model, out = exported
    hf = load_export(out)
    tokens = tokens_for(model.cfg, batch=2, seq=10)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    pieces, cache = [], DynamicCache()
    with torch.no_grad():
        whole = hf(tokens, attention_mask=mask, use_cache=False).logits
        for start, end in ((0, 4), (4, 7), (7, 10)):
            result = hf(tokens[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
            pieces.append(result.logits)
        with pytest.raises(ValueError, match="attention_mask covers 3 positions; the cache holds 10"):
            hf(tokens[:, :3], attention_mask=mask[:, :3], cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="only transformers' DynamicCache is supported, not tuple"):
            hf(tokens, cache=((tokens, tokens),), use_cache=True)
    assert cache.get_seq_length() == 10
    with torch.no_grad():  # what generate() asks for: the last position's logits only
        last = hf(tokens, attention_mask=mask, use_cache=False, logits_to_keep=1).logits
    torch.testing.assert_close(last, whole[:, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(pieces, dim=1)[0, 3:], whole[0, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(pieces, dim=1)[1], whole[1], atol=1e-5, rtol=1e-5)


# Prefilled in chunks of 2, the 3 pads end inside the second chunk, with the cache holding 2 of them.
@pytest.mark.parametrize("options", [{"use_cache": True}, {"use_cache": False},
                                     {"use_cache": True, "prefill_chunk_size": 2}])
def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(exported, options):
    model, out = exported
    hf = load_export(out)
    short, long = tokens_for(model.cfg, batch=1, seq=3), tokens_for(model.cfg, batch=1, seq=6) + 1
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    generated = hf.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, **options)
    assert torch.equal(generated[0, 3:], greedy_continuation(model, short, 8)[0])
    assert torch.equal(generated[1], greedy_continuation(model, long, 8)[0])


def test_inputs_embeds_stand_for_their_tokens(exported):
    model, out = exported
    hf = load_export(out)
    tokens = tokens_for(model.cfg, batch=2, seq=6)
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(tokens)
        torch.testing.assert_close(hf(inputs_embeds=embeds).logits, logits(model, tokens), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
            hf(tokens, inputs_embeds=embeds)
    generated = hf.generate(inputs_embeds=embeds[:1], max_new_tokens=5, do_sample=False)  # the new tokens only
    assert torch.equal(generated[0], greedy_continuation(model, tokens[:1], 5)[0, 6:])


def test_gradient_checkpointing_recomputes_each_layer_and_gives_the_same_gradients(exported):
    model, out = exported
    hf = load_export(out).train()
    tokens = tokens_for(model.cfg)
    runs = []
    hf.transformer.layers[1].attn.register_forward_hook(lambda *_: runs.append(1))

    def gradients() -> dict:
        hf.zero_grad()
        runs.clear()
        hf(tokens, labels=tokens).loss.backward()
        return {name: p.grad.clone() for name, p in hf.named_parameters()}

    plain = gradients()
    assert len(runs) == 1
    # transformers 5 names it activation checkpointing; 4.x gradient checkpointing
    enable = getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable
    enable()
    recomputed = gradients()
    assert len(runs) == 2  # the layer ran again in the backward
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, atol=1e-6, rtol=1e-6)


def test_num_items_in_batch_divides_the_summed_loss(exported):
    # transformers' Trainer passes it under gradient accumulation (the labels counted over the whole step)
    # and then leaves the division to the model.
    model, out = exported
    hf = load_export(out)
    tokens = tokens_for(model.cfg)
    labels = tokens.clone()
    labels[0, :5] = -100
    summed = F.cross_entropy(logits(model, tokens)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                             reduction="sum")
    counted = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        mean = hf(tokens, labels=labels).loss
        for n in (counted, 3 * counted, torch.tensor(3 * counted)):
            torch.testing.assert_close(hf(tokens, labels=labels, num_items_in_batch=n).loss, summed / n)
    torch.testing.assert_close(mean, summed / counted)


def test_logits_to_keep_with_labels_still_gives_the_loss_of_the_whole_input(exported):
    model, out = exported
    hf = load_export(out)
    tokens = tokens_for(model.cfg)
    with torch.no_grad():
        whole = hf(tokens, labels=tokens)
        for keep, kept in ((1, [-1]), (torch.tensor([0, 5]), [0, 5])):
            result = hf(tokens, labels=tokens, logits_to_keep=keep)
            torch.testing.assert_close(result.loss, whole.loss)
            torch.testing.assert_close(result.logits, whole.logits[:, kept])


def test_hidden_states_are_the_embeddings_and_each_layers_output_and_attentions_are_refused(exported):
    model, out = exported
    hf = load_export(out)
    tokens = tokens_for(model.cfg)
    outputs = []
    for layer in model.transformer.layers:
        layer.register_forward_hook(lambda _module, _input, output: outputs.append(output))
    ours = logits(model, tokens)
    with torch.no_grad():
        # transformers' convention (LlamaModel's): the last one after the final norm
        expected = [model.transformer.token_embeddings(tokens), *outputs[:-1], model.transformer.norm(outputs[-1])]
        result = hf(tokens, output_hidden_states=True)
        assert hf(tokens).hidden_states is None
        with pytest.raises(ValueError, match="output_attentions=True: OpenELM has no attention weights to return"):
            hf(tokens, output_attentions=True)
    assert len(result.hidden_states) == len(expected) == 4
    for i, (state, wanted) in enumerate(zip(result.hidden_states, expected)):
        torch.testing.assert_close(state, wanted, atol=1e-5, rtol=1e-5, msg=f"hidden state {i}")
    torch.testing.assert_close(result.logits, ours, atol=1e-5, rtol=1e-5)


def test_packed_sequences_attend_each_within_itself(exported):
    # As padding-free collators (DataCollatorWithFlattening) give them: one row, position_ids restarting at 0.
    model, out = exported
    hf = load_export(out)
    a, b = tokens_for(model.cfg, batch=1, seq=5), tokens_for(model.cfg, batch=1, seq=8) + 1
    packed, position_ids = torch.cat([a, b], dim=1), torch.cat([torch.arange(5), torch.arange(8)])[None]
    with torch.no_grad():
        result = hf(packed, position_ids=position_ids).logits
        cache = DynamicCache()
        hf(a, cache=cache, use_cache=True)
        with pytest.raises(ValueError, match=r"position_ids restart within the input \(packed sequences\) while the "
                                             "cache holds 5 tokens"):
            hf(packed, position_ids=position_ids, cache=cache, use_cache=True)
    torch.testing.assert_close(result[:, :5], logits(model, a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result[:, 5:], logits(model, b), atol=1e-5, rtol=1e-5)


def test_position_ids_after_cached_tokens_set_their_distance_in_the_rotary_embedding(exported):
    # RoPE sees only distances: new tokens placed `gap` positions after the cached prefix attend to it as they
    # would across `gap` hidden tokens.
    model, out = exported
    hf = load_export(out)
    tokens, gap = tokens_for(model.cfg, seq=7), 5
    prefix, new = tokens[:, :4], tokens[:, 4:]

    def after_the_prefix(**kwargs) -> torch.Tensor:
        cache = DynamicCache()
        hf(prefix, cache=cache, use_cache=True)
        return hf(new, cache=cache, use_cache=True, **kwargs).logits

    spaced = torch.cat([prefix, torch.zeros(2, gap, dtype=torch.long), new], dim=1)
    mask = torch.ones_like(spaced)
    mask[:, 4:4 + gap] = 0
    with torch.no_grad():
        shifted = after_the_prefix(position_ids=torch.arange(4 + gap, 7 + gap)[None])
        whole = hf(spaced, attention_mask=mask, position_ids=torch.arange(7 + gap)[None], use_cache=False).logits
        counted = after_the_prefix()
    torch.testing.assert_close(shifted, whole[:, 4 + gap:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shifted, counted, atol=1e-3)


def test_loading_with_attn_implementation_sdpa_gives_the_same_logits(exported):
    model, out = exported
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation="sdpa").eval()
    assert hf.config._attn_implementation == "sdpa"
    tokens = tokens_for(model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, logits(model, tokens), atol=1e-5, rtol=1e-5)


def test_tokenizer_is_exported_for_autotokenizer(tiny_dataset, tmp_path):
    out = save_hf_checkpoint(random_model(small_config(vocab_size=300)), tmp_path / "hf", tokenizer_dir=tiny_dataset)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "select the row from the table"
    raw = Tokenizer.from_file(str(tiny_dataset / "tokenizer.json"))
    ids = raw.encode(text, add_special_tokens=False).ids
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok(text)["input_ids"] == [1, *ids]  # <s> first, once, as training framed documents
    assert tok([text, "the table"])["input_ids"][1] == [1, *raw.encode("the table", add_special_tokens=False).ids]
    # elmforge itself encodes without special tokens: the exported file tokenizes data as the original does.
    exported, original = load_tokenizer(out / "tokenizer.json"), load_tokenizer(tiny_dataset / "tokenizer.json")
    assert exported.encode_batch([text]) == [ids] and exported.same_ids_as(original)


def test_a_sentencepiece_tokenizer_is_exported_to_frame_text_with_bos_as_in_training(tmp_path):
    import sentencepiece as spm

    from corpus import make_documents

    spm.SentencePieceTrainer.train(sentence_iterator=iter(make_documents(200, seed=5)),
                                   model_prefix=str(tmp_path / "tokenizer"), vocab_size=90, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, character_coverage=1.0, minloglevel=2,
                                   model_type="bpe", normalization_rule_name="identity",  # as LLaMA's
                                   remove_extra_whitespaces=False)
    out = save_hf_checkpoint(random_model(small_config(vocab_size=300)), tmp_path / "hf", tokenizer_dir=tmp_path)
    tok = AutoTokenizer.from_pretrained(out)
    text = "select the row from the table"
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert tok(text)["input_ids"] == [1, *sp.encode(text)]  # <s> first, as `elmforge generate` feeds it


def test_a_tokenizer_larger_than_the_model_is_refused_by_eval_and_generate(tiny_dataset, tmp_path, capsys):
    from cluster.cli import main

    out = save_hf_checkpoint(random_model(small_config(vocab_size=200)), tmp_path / "hf")
    tokenizer = str(tiny_dataset / "tokenizer.json")  # 300 tokens
    assert main(["generate", str(out), "--tokenizer", tokenizer, "--prompt", "x", "--greedy"]) == 1
    assert f"--tokenizer {tokenizer} has 300 tokens, more than the 200 of the model at {out}" in capsys.readouterr().err
    assert main(["eval", str(out), f"data.dir={tiny_dataset}"]) == 1  # the tokenizer is the dataset's: named so
    assert f"the tokenizer of data.dir={tiny_dataset} has 300 tokens, more than the 200" in capsys.readouterr().err


def test_eval_refuses_samples_longer_than_the_models_context_and_says_where_the_length_came_from(
        tiny_dataset, tmp_path, capsys):
    from cluster.cli import main

    out = save_hf_checkpoint(random_model(small_config(vocab_size=300, max_context_length=16)), tmp_path / "hf",
                             tokenizer_dir=tiny_dataset)
    assert main(["eval", str(out), f"data.dir={tiny_dataset}"]) == 1  # its samples have 32 tokens
    assert (f"elmforge eval: {tiny_dataset} was prepared with data.seq_len=32: longer than the model's context (16 tokens, "
            "max_context_length); score files with --text --seq-len 16") in capsys.readouterr().err
    text = tmp_path / "a.txt"
    text.write_text("the table holds rows " * 50)
    assert main(["eval", str(out), "--text", str(text)]) == 1  # the default data.seq_len, not a --seq-len given
    assert ("data.seq_len=128 (a Hugging Face directory records no length): longer than the model's context "
            "(16 tokens, max_context_length); give --seq-len 16 or less") in capsys.readouterr().err
    assert main(["eval", str(out), "--text", str(text), "--seq-len", "16"]) == 0


def test_config_json_carries_the_exported_tokenizers_own_bos_and_eos_ids(tmp_path):
    from tokenizers import models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))  # a tokenizer.json that puts <s> first, as RoBERTa's does
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["select the row from the table"] * 10,
                            trainers.BpeTrainer(vocab_size=100, special_tokens=["<s>", "</s>", "<unk>"]))
    bpe.save(str(tmp_path / "tokenizer.json"))
    out = save_hf_checkpoint(random_model(small_config(vocab_size=300)), tmp_path / "hf", tokenizer_dir=tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert (load_export(out).generation_config.eos_token_id, config["use_cache"]) == (1, True)  # generate() stops here
    bare = json.loads(save_hf_checkpoint(random_model(small_config()), tmp_path / "bare").joinpath(
        "config.json").read_text())
    assert (bare["bos_token_id"], bare["eos_token_id"]) == (1, 2)  # no tokenizer: LLaMA's, as released


# ---------------------------------------------------------------------------- (c) Apple's release layout


def apple_style_config(**overrides) -> dict:
    """config.json as Apple published it: per-layer lists, ffn_multipliers rounded to 2 places, (min, max) qkv."""
    config = {
        "activation_fn_name": "swish",
        "architectures": ["OpenELMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_openelm.OpenELMConfig",
            "AutoModelForCausalLM": "modeling_openelm.OpenELMForCausalLM",
        },
        "bos_token_id": 1,
        "eos_token_id": 2,
        "ffn_dim_divisor": 16,
        "ffn_multipliers": [0.5, 1.37, 2.25],  # 64x: 32, 87.68 -> 80, 144
        "ffn_with_glu": True,
        "head_dim": 16,
        "initializer_range": 0.02,
        "max_context_length": 64,
        "model_dim": 64,
        "model_type": "openelm",
        "normalization_layer_name": "rms_norm",
        "normalize_qk_projections": True,
        "num_gqa_groups": 2,
        "num_kv_heads": [1, 2, 2],
        "num_query_heads": [2, 4, 4],
        "num_transformer_layers": 3,
        "qkv_multipliers": [0.5, 1.0],
        "rope_freq_constant": 10000,
        "rope_max_length": 128,
        "share_input_output_layers": True,
        "torch_dtype": "float32",
        "transformers_version": "4.39.3",
        "use_cache": True,
        "vocab_size": 97,
    }
    return {**config, **overrides}


def write_hf_dir(path, config: dict, weights: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))


def test_apple_style_checkpoint_loads(tmp_path):
    source = random_model(small_config(num_query_heads=[2, 4, 4], num_kv_heads=[1, 2, 2], ffn_dims=[32, 80, 144]))
    write_hf_dir(tmp_path, apple_style_config(), source.state_dict())
    loaded = load_hf_checkpoint(tmp_path)
    assert list(loaded.plan.ffn_dims) == [32, 80, 144]
    tokens = tokens_for(source.cfg)
    assert torch.equal(logits(loaded, tokens), logits(source, tokens))


def test_apple_style_variants_load_one_qkv_multiplier_and_sharded_weights_named(tmp_path):
    source = random_model(small_config(num_query_heads=[2, 4, 4], num_kv_heads=[1, 2, 2], ffn_dims=[32, 80, 144]))
    write_hf_dir(tmp_path, apple_style_config(qkv_multipliers=1.0), source.state_dict())  # one number, all layers
    tokens = tokens_for(source.cfg)
    assert torch.equal(logits(load_hf_checkpoint(tmp_path), tokens), logits(source, tokens))
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in source.state_dict()}}))
    with pytest.raises(ValueError, match=r"its weights are split into shards \(model.safetensors.index.json\)"):
        load_hf_checkpoint(tmp_path)


def test_the_released_270m_config_gives_the_released_model():
    betas = [round(float(b), 2) for b in np.linspace(0.5, 4.0, 16)]
    q_heads = [12] * 5 + [16] * 7 + [20] * 4
    config = apple_style_config(
        num_transformer_layers=16, model_dim=1280, head_dim=64, num_gqa_groups=4, ffn_dim_divisor=256,
        ffn_multipliers=betas, num_query_heads=q_heads, num_kv_heads=[q // 4 for q in q_heads], vocab_size=32000,
        max_context_length=2048, rope_max_length=4096,
    )
    cfg = config_from_hf(config)
    assert cfg.layer_plan() == released("openelm_270m").layer_plan()
    assert build_model(cfg, device="meta").num_params() == 271_527_168


def test_an_imported_release_is_exported_again_in_the_release_form(tmp_path):
    # Apple's config class reads qkv_multipliers only as one number or (min, max): a fine-tuned release
    # must export them so, and its ffn_multipliers as the release's rounded shares.
    source = random_model(small_config(num_query_heads=[2, 4, 4], num_kv_heads=[1, 2, 2], ffn_dims=[32, 96, 144]))
    release = apple_style_config(ffn_multipliers=[0.5, 1.38, 2.25])  # round(linspace(0.5, 2.25, 3), 2)
    write_hf_dir(tmp_path / "release", release, source.state_dict())
    out = save_hf_checkpoint(load_hf_checkpoint(tmp_path / "release"), tmp_path / "again")
    written = json.loads((out / "config.json").read_text())
    keys = ("qkv_multipliers", "ffn_multipliers", "num_query_heads", "num_kv_heads", "rope_freq_constant")
    assert {k: written[k] for k in keys} == {k: release[k] for k in keys}
    assert type(written["rope_freq_constant"]) is int
    # Widths the formula does not give (1.37 x 64 rounds down to 80) are written as each layer's share.
    write_hf_dir(tmp_path / "other", apple_style_config(), random_model(small_config(
        num_query_heads=[2, 4, 4], num_kv_heads=[1, 2, 2], ffn_dims=[32, 80, 144])).state_dict())
    out = save_hf_checkpoint(load_hf_checkpoint(tmp_path / "other"), tmp_path / "other_again")
    written = json.loads((out / "config.json").read_text())
    assert written["ffn_multipliers"] == [0.5, 1.25, 2.25] and written["qkv_multipliers"] == [0.5, 1.0]
    assert list(load_hf_checkpoint(out).plan.ffn_dims) == [32, 80, 144]


# ---------------------------------------------------------------------------- (d) clear errors


def _drop_norm(w):
    w.pop("transformer.norm.weight")


def _shrink_qkv(w):
    w["transformer.layers.1.attn.qkv_proj.weight"] = w["transformer.layers.1.attn.qkv_proj.weight"][:-16]


def _add_head(w):
    w["lm_head.weight"] = w["transformer.token_embeddings.weight"].clone()


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_drop_norm, r"model\.safetensors: missing tensor 'transformer\.norm\.weight'"),
        (_shrink_qkv, r"'transformer\.layers\.1\.attn\.qkv_proj\.weight' has shape \(112, 64\), the model expects \(128, 64\)"),
        (_add_head, r"model\.safetensors: unexpected tensor 'lm_head\.weight'"),
    ],
)
def test_bad_weights_are_named(corrupt, message, tmp_path):
    weights = random_model(small_config(num_query_heads=[2, 4, 4], num_kv_heads=[1, 2, 2], ffn_dims=[32, 80, 144])).state_dict()
    corrupt(weights)
    write_hf_dir(tmp_path, apple_style_config(), weights)
    with pytest.raises(ValueError, match=message):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_query_heads": None}, r"config\.json: missing key 'num_query_heads'"),
        ({"ffn_multipliers": [0.5, 4.0]}, r"ffn_multipliers must list one value per layer \(3\)"),
        ({"ffn_with_glu": False}, r"ffn_with_glu=False is not supported"),
        ({"head_dim": 33}, r"config\.json: head_dim=33 is odd"),  # the first forward failed on it
    ],
)
def test_bad_configs_are_named(change, message):
    config = {k: v for k, v in {**apple_style_config(), **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        config_from_hf(config)


# ---------------------------------------------------------------------------- (e) DeepSpeed checkpoints


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """The same tiny run under ZeRO 0, 2 and 3: {stage: (model config, checkpoint dir)}."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for stage in (0, 2, 3):
        cfg = compose_config(
            [*SMALL_MODEL, f"data.dir={tiny_dataset}", f"storage_path={root / str(stage)}", f"deepspeed=zero{stage}",
             "logger=none", "train.max_steps=2", "train.warmup_steps=1", "train.micro_batch_size=4"]
        )
        runs[stage] = (OpenELMConfig(**cfg["model"]), train(cfg)["checkpoint"])
    return runs


def test_every_zero_stage_consolidates_to_the_same_trained_weights(trained):
    cfg, _ = trained[2]
    initial = build_model(cfg, seed=0).state_dict()
    weights = {stage: consolidated_state_dict(ckpt) for stage, (_, ckpt) in trained.items()}
    for stage, state in weights.items():
        assert state.keys() == initial.keys(), stage
        assert all(v.dtype == torch.float32 for v in state.values())
    assert not torch.equal(weights[2]["transformer.layers.0.attn.qkv_proj.weight"], initial["transformer.layers.0.attn.qkv_proj.weight"])
    # fp32 on one rank: the stages take the same steps; only the optimizer's flattening may differ in the last bit.
    for stage in (0, 3):
        for name in initial:
            torch.testing.assert_close(weights[stage][name], weights[2][name], atol=2e-7, rtol=1e-6, msg=name)


@pytest.mark.parametrize("stage", [0, 2])
def test_a_bf16_run_consolidates_to_its_fp32_master_weights(tiny_dataset, tmp_path, stage):
    cfg = compose_config(
        [*SMALL_MODEL, f"data.dir={tiny_dataset}", f"storage_path={tmp_path}", f"deepspeed=zero{stage}",
         "logger=none", "train.max_steps=2", "train.warmup_steps=1", "train.micro_batch_size=4", "train.precision=bf16"]
    )
    weights = consolidated_state_dict(train(cfg)["checkpoint"])
    assert weights.keys() == build_model(OpenELMConfig(**cfg["model"])).state_dict().keys()
    for name, w in weights.items():  # trained in fp32 by AdamW: not all of them bf16 values any more
        assert w.dtype == torch.float32 and not torch.equal(w, w.bfloat16().float()), name


def test_exported_checkpoint_loads_as_the_consolidated_weights(trained, tiny_dataset, tmp_path):
    cfg, ckpt = trained[3]
    out = export_checkpoints([ckpt], tmp_path / "hf", cfg, tokenizer_dir=tiny_dataset)
    direct = build_model(cfg).eval()
    direct.load_state_dict(consolidated_state_dict(ckpt))
    tokens = tokens_for(cfg, seq=32)
    exported = logits(load_hf_checkpoint(out), tokens)
    assert torch.isfinite(exported).all()
    assert torch.equal(exported, logits(direct, tokens))
    assert (out / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------- (f) checkpoint averaging


def test_average_is_the_elementwise_mean():
    a, b = random_model(small_config(), seed=1).state_dict(), random_model(small_config(), seed=2).state_dict()
    mean = average_state_dicts([a, b])
    for name in a:
        torch.testing.assert_close(mean[name], (a[name] + b[name]) / 2)
    with pytest.raises(ValueError, match="different keys"):
        average_state_dicts([a, {k: v for k, v in b.items() if k != "transformer.norm.weight"}])


def test_exporting_several_checkpoints_averages_them(trained, tmp_path):
    cfg, ckpt_0 = trained[0]
    _, ckpt_3 = trained[3]
    out = export_checkpoints([ckpt_0, ckpt_3], tmp_path / "hf", cfg)
    exported = load_file(str(out / "model.safetensors"))
    a, b = consolidated_state_dict(ckpt_0), consolidated_state_dict(ckpt_3)
    for name in a:
        torch.testing.assert_close(exported[name], (a[name] + b[name]) / 2)
