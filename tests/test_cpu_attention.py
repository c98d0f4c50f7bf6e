"""The short-sequence CPU attention (trainer/cpu_attention.py) computes causal grouped-query attention
and its gradients as plain float64 math does, and the model takes it exactly where it should."""

import pytest
import torch

from test_onednn_linear import model_and_reference_grads
from trainer.cpu_attention import SHORT_SEQ_MAX, short_attention_applies, short_causal_attention
from trainer.loss import lm_loss
from trainer.model import OpenELMConfig
from trainer import onednn_linear
from trainer.onednn_linear import ONEDNN_AVAILABLE

pytestmark = pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="this torch build has no oneDNN")


@pytest.fixture(autouse=True)
def onednn_paths(monkeypatch):
    """The oneDNN paths, on every processor (on Intel's the model takes torch's own products)."""
    monkeypatch.setattr(onednn_linear, "ONEDNN_CPU_MATMUL", True)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v, (B, S, H, D) layout, KV heads repeated per group."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.repeat_interleave(groups, 2).transpose(1, 2), v.repeat_interleave(groups, 2).transpose(1, 2)
    seq = q.shape[2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("q_heads, kv_heads", [(4, 4), (6, 3), (8, 2)])
def test_matches_plain_attention_forward_and_backward(q_heads, kv_heads):
    gen = torch.Generator().manual_seed(0)
    b, s, d = 2, 48, 16
    # q, k, v as the model has them: views of one projection's output (v not contiguous).
    qkv = torch.randn(b, s, q_heads + 2 * kv_heads, d, generator=gen).requires_grad_()
    grad = torch.randn(b, q_heads, s, d, generator=gen).transpose(1, 2)  # a non-contiguous incoming gradient
    qkv64 = qkv.detach().double().requires_grad_()

    def split(t):
        return t.split([q_heads, kv_heads, kv_heads], dim=2)

    out = short_causal_attention(*split(qkv))
    assert out.grad_fn.name() == "_ShortCausalAttentionBackward"
    out.backward(grad)
    expected = plain_attention(*split(qkv64))
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, atol=1e-5, rtol=1e-5)


def test_applies_to_short_fp32_cpu_sequences_with_large_enough_products():
    def q(seq, heads=16, head_dim=64, dtype=torch.float32):
        return torch.empty(2, seq, heads, head_dim, dtype=dtype)

    assert short_attention_applies(q(256), kv_heads=4)  # OpenELM-270M's batch shape
    assert not short_attention_applies(q(SHORT_SEQ_MAX + 1), kv_heads=4)  # long: flash attention
    assert not short_attention_applies(q(128, heads=8, head_dim=32), kv_heads=4)  # the tiny model's: too small
    assert not short_attention_applies(q(256, dtype=torch.bfloat16), kv_heads=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not short_attention_applies(q(256), kv_heads=4)


def graph_names(tensor: torch.Tensor) -> set[str]:
    names, todo, seen = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_model_takes_it_and_matches_the_reference_gradients():
    # head_dim 64 and 256 tokens, as OpenELM-270M: the path's products are large enough here.
    cfg = OpenELMConfig(num_layers=2, model_dim=128, head_dim=64, num_gqa_groups=1, ffn_dim_divisor=32, vocab_size=300)
    model, reference_grads = model_and_reference_grads(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, SHORT_SEQ_MAX + 1), generator=torch.Generator().manual_seed(1))
    loss, _ = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], 1e-4)
    assert "_ShortCausalAttentionBackward" in graph_names(loss)
    loss.backward()
    expected = reference_grads(tokens)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[name], atol=2e-6, rtol=1e-4, msg=name)
