"""RMSNorm, SwiGLU and RoPE with written-out gradients (trainer/cpu_elementwise.py) compute what the
plain expressions compute, values and gradients, and the model uses them exactly on the CPU fp32 path."""

import pytest
import torch
import torch.nn.functional as F

from test_cpu_attention import graph_names
from trainer.cpu_elementwise import rms_norm, rope, swiglu
from trainer.loss import lm_loss
from trainer.model import build_model, rope_tables, OpenELMConfig


def plain_rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def plain_rope(x, cos, signed_sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([x2, x1], dim=-1) * signed_sin


def plain_swiglu(h):
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value


def _assert_matches_plain(fused, plain, inputs, grad):
    """fp32 values and input gradients of `fused` against `plain` in float64."""
    ours = [t.detach().clone().requires_grad_() for t in inputs]
    ref = [t.detach().double().requires_grad_() for t in inputs]
    out = fused(*ours)
    out.backward(grad)
    expected = plain(*ref)
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-5)


def _strided(shape, gen):
    """A non-contiguous tensor of `shape`: the model's norms and RoPE see split views and
    transposed gradients."""
    return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2)


@pytest.mark.parametrize("shape", [(2, 5, 48), (2, 5, 3, 16)])
def test_rms_norm_matches_the_plain_expression(shape):
    gen = torch.Generator().manual_seed(0)
    x, weight = _strided(shape, gen), torch.randn(shape[-1], generator=gen)
    eps = 0.25  # large enough to matter
    _assert_matches_plain(lambda x, w: rms_norm(x, w, eps), lambda x, w: plain_rms_norm(x, w, eps),
                          [x, weight], _strided(shape, gen))


def test_rope_matches_the_plain_expression():
    gen = torch.Generator().manual_seed(1)
    cos, signed_sin = rope_tables(7, 16, 10000.0, torch.device("cpu"))
    _assert_matches_plain(lambda x: rope(x, cos, signed_sin), lambda x: plain_rope(x, cos.double(), signed_sin.double()),
                          [_strided((2, 7, 3, 16), gen)], _strided((2, 7, 3, 16), gen))


def test_swiglu_matches_the_plain_expression():
    gen = torch.Generator().manual_seed(2)
    _assert_matches_plain(swiglu, plain_swiglu, [torch.randn(2, 5, 24, generator=gen)], _strided((2, 5, 12), gen))


def test_gradients_pass_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, generator=gen, requires_grad=True)
    cos, signed_sin = (t.double() for t in rope_tables(4, 8, 10000.0, torch.device("cpu")))
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6), (x, weight))
    assert torch.autograd.gradcheck(lambda x: rope(x, cos, signed_sin), (x,))
    assert torch.autograd.gradcheck(swiglu, (x,))


FUSED_NODES = {"_RMSNormBackward", "_RoPEBackward", "_SwiGLUBackward"}


def test_the_model_uses_them_in_fp32_on_cpu_and_not_under_autocast():
    cfg = OpenELMConfig(num_layers=2, model_dim=64, head_dim=16, vocab_size=100)
    model = build_model(cfg, seed=0).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    loss, _ = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], 1e-4)
    assert FUSED_NODES <= graph_names(loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens[:, :-1])
    assert not FUSED_NODES & graph_names(logits)
