import weakref

import pytest
import torch

from reference_openelm import reference_layer_plan, reference_logits, reference_loss
from trainer.layer_scaling import make_divisible
from trainer.loss import lm_loss
from trainer.model import OpenELMConfig, build_model

SIZES = {  # name: (layers, d, head_dim)
    "openelm_270m": (16, 1280, 64),
    "openelm_450m": (20, 1536, 64),
    "openelm_1_1b": (28, 2048, 64),
    "openelm_3b": (36, 3072, 128),
}


def released(name: str) -> OpenELMConfig:
    layers, d, hd = SIZES[name]
    return OpenELMConfig(
        name=name, num_layers=layers, model_dim=d, head_dim=hd, num_gqa_groups=4, ffn_dim_divisor=256, vocab_size=32000
    )


def small_config(**overrides) -> OpenELMConfig:
    base = dict(num_layers=3, model_dim=64, head_dim=16, num_gqa_groups=2, ffn_dim_divisor=16, vocab_size=97)
    return OpenELMConfig(**{**base, **overrides})


def test_270m_has_exactly_the_released_parameter_count():
    model = build_model(released("openelm_270m"), device="meta")
    assert model.num_params() == 271_527_168


def test_270m_layer_plan_matches_the_release():
    plan = released("openelm_270m").layer_plan()
    assert list(plan.num_query_heads) == [12] * 5 + [16] * 7 + [20] * 4
    assert list(plan.num_kv_heads) == [q // 4 for q in plan.num_query_heads]
    assert plan.ffn_dims[0] == 768 and plan.ffn_dims[-1] == 5120
    assert list(plan.ffn_dims) == sorted(plan.ffn_dims)


@pytest.mark.parametrize("name", list(SIZES))
def test_every_size_matches_the_independent_reference_plan(name):
    layers, d, hd = SIZES[name]
    ref = reference_layer_plan(layers, d, hd, 4)
    plan = released(name).layer_plan()
    assert list(plan.num_query_heads) == ref["num_query_heads"]
    assert list(plan.num_kv_heads) == ref["num_kv_heads"]
    assert list(plan.ffn_dims) == ref["ffn_dims"]


def test_make_divisible_never_rounds_below_ninety_percent():
    assert make_divisible(640, 256) == 768
    assert make_divisible(100, 256) == 256  # floor at the divisor
    assert make_divisible(1150, 1000) == 2000  # 1000 < 0.9 * 1150, so one more step
    assert make_divisible(1000, 256) == 1024


def test_explicit_per_layer_lists_override_the_formula():
    cfg = small_config(num_query_heads=[2, 4, 6], num_kv_heads=[1, 2, 3], ffn_dims=[32, 48, 64])
    model = build_model(cfg, seed=0)
    attn = model.transformer.layers[2].attn
    assert attn.qkv_proj.out_features == (6 + 2 * 3) * 16
    assert model.transformer.layers[1].ffn.proj_2.in_features == 48


@pytest.mark.parametrize(
    "lists, message",
    [
        (dict(num_query_heads=[2, 4, 6], num_kv_heads=[1, 2, 3]), "none of them"),
        (dict(num_query_heads=[2, 4], num_kv_heads=[1, 2], ffn_dims=[32, 32]), "num_layers is 3"),
        (dict(num_query_heads=[2, 4, 5], num_kv_heads=[1, 2, 2], ffn_dims=[32] * 3), "layer 2"),
    ],
)
def test_inconsistent_per_layer_lists_are_refused(lists, message):
    with pytest.raises(ValueError, match=message):
        small_config(**lists).layer_plan()


def test_logits_match_the_plain_reference():
    cfg = small_config(ffn_multipliers=[0.5, 4.0])
    model = build_model(cfg, seed=0).eval()
    # Random norm weights too, so a misplaced norm cannot hide behind weight = 1.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    tokens = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    plan = model.plan
    expected = reference_logits(
        model.state_dict(),
        tokens,
        model_dim=cfg.model_dim,
        head_dim=cfg.head_dim,
        num_query_heads=list(plan.num_query_heads),
        num_kv_heads=list(plan.num_kv_heads),
        ffn_dims=list(plan.ffn_dims),
    )
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (2, 19, cfg.vocab_size)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    targets = torch.roll(tokens, -1, dims=1)
    total, _ = lm_loss(logits, targets, 1e-4)
    torch.testing.assert_close(total, reference_loss(expected, targets, 1e-4), atol=1e-5, rtol=1e-5)


def test_attention_is_causal():
    cfg = small_config()
    model = build_model(cfg, seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    changed = tokens.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=0, rtol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_init_follows_the_scheme():
    cfg = small_config(model_dim=256, head_dim=32, num_layers=8, vocab_size=2000, ffn_dim_divisor=64)
    model = build_model(cfg, seed=0)
    layer = model.transformer.layers[4]
    assert layer.attn.qkv_proj.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert layer.ffn.proj_2.weight.std().item() == pytest.approx(256**-0.5 / 4, rel=0.05)
    assert layer.attn.out_proj.weight.std().item() == pytest.approx(256**-0.5 / 4, rel=0.05)
    assert model.transformer.token_embeddings.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert torch.equal(layer.attn.q_norm.weight, torch.ones(32))


def test_same_seed_same_init_and_activation_checkpointing_gives_same_gradients():
    cfg = small_config()
    tokens = torch.randint(0, cfg.vocab_size, (2, 10))
    grads = []
    for ckpt in (False, True):
        model = build_model(small_config(activation_checkpointing=ckpt), seed=3)
        loss, _ = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], 1e-4)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_z_loss_adds_the_mean_squared_logsumexp():
    logits = torch.randn(4, 5, 11)
    targets = torch.randint(0, 11, (4, 5))
    total, ce = lm_loss(logits, targets, 0.5)
    z = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(total - ce, 0.5 * z)


def test_loss_gradients_match_autograd_through_the_reference_loss():
    logits = torch.randn(3, 7, 50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    # Both outputs carry gradient, with different weights, so each backward term is checked.
    assert torch.autograd.gradcheck(lambda x: (lambda t, c: t + 0.3 * c)(*lm_loss(x, targets, 0.5)), (logits,))
    total, ce = lm_loss(logits, targets, 0.5)
    (total + 0.3 * ce).backward()
    ours, logits.grad = logits.grad, None
    (reference_loss(logits, targets, 0.5) + 0.3 * reference_loss(logits, targets, 0.0)).backward()
    torch.testing.assert_close(ours, logits.grad)


def test_bf16_logits_get_bf16_gradients_from_an_fp32_loss():
    logits = torch.randn(2, 5, 40).bfloat16().requires_grad_()
    targets = torch.randint(0, 40, (2, 5))
    total, _ = lm_loss(logits, targets, 1e-4)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, reference_loss(logits.float(), targets, 1e-4))
    total.backward()
    expected = logits.detach().float().requires_grad_()
    reference_loss(expected, targets, 1e-4).backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), expected.grad, atol=1e-3, rtol=1e-2)


def test_fp32_loss_keeps_the_softmax_numerator_not_the_logits():
    inputs, weight = torch.randn(4, 6), torch.randn(6, 30, requires_grad=True)
    targets = torch.randint(0, 30, (4,))
    logits = inputs @ weight
    logits_alive = weakref.ref(logits)
    total, _ = lm_loss(logits, targets, 1e-4)
    del logits
    assert logits_alive() is None  # the graph holds exp(logits - max), as large, in their place
    total.backward()
    ours, weight.grad = weight.grad, None
    reference_loss(inputs @ weight, targets, 1e-4).backward()
    torch.testing.assert_close(ours, weight.grad)


def test_loss_backward_twice_through_a_retained_graph_gives_the_same_gradient():
    logits = torch.randn(3, 20, requires_grad=True)
    targets = torch.randint(0, 20, (3,))
    total, ce = lm_loss(logits, targets, 0.5)
    (total + ce).backward(retain_graph=True)
    first, logits.grad = logits.grad, None
    (total + ce).backward()
    torch.testing.assert_close(logits.grad, first, atol=0, rtol=0)
