"""The CPU oneDNN paths give the gradients plain autograd gives (trainer/onednn_linear.py)."""

import pytest
import torch
import torch.nn.functional as F

from reference_openelm import reference_kwargs, reference_logits, reference_loss
from trainer.loss import lm_loss
from trainer.model import OpenELMConfig, build_model
from trainer import onednn_linear
from trainer.onednn_linear import ONEDNN_AVAILABLE, ONEDNN_GRAD_INPUT_BLOCK, linear

pytestmark = pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="this torch build has no oneDNN")


@pytest.fixture(autouse=True)
def onednn_paths(monkeypatch):
    """The oneDNN paths, on every processor (on Intel's the model takes torch's own products)."""
    monkeypatch.setattr(onednn_linear, "ONEDNN_CPU_MATMUL", True)


@pytest.mark.parametrize(
    "n_in, n_out",
    [
        (96, 2 * ONEDNN_GRAD_INPUT_BLOCK + 75),  # input gradient in three blocks (the last partial); x^T copied
        (1100, 160),  # input gradient in one block; the weight gradient's other operand order (grad^T copied)
    ],
)
def test_linear_matches_f_linear_forward_and_backward(n_in, n_out):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, n_in, generator=gen, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(n_out, n_in, generator=gen).requires_grad_()
    grad = torch.randn(n_out, 3, 50, generator=gen).permute(1, 2, 0)  # a non-contiguous incoming gradient
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    out = linear(x, w)
    assert out.grad_fn.name() == "_OneDNNLinearBackward"
    out.backward(grad)
    F.linear(x64, w64).backward(grad.double())
    torch.testing.assert_close(out.double(), F.linear(x64, w64).detach(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-4, rtol=1e-5)


def model_and_reference_grads(cfg: OpenELMConfig):
    """Our model (seed 0) and a function giving the float64 reference's gradients on the same weights."""
    model = build_model(cfg, seed=0).train()
    kwargs = reference_kwargs(model)
    ref_weights = {k: v.detach().double().requires_grad_() for k, v in model.state_dict().items()}

    def reference_grads(tokens):
        logits = reference_logits.__wrapped__(ref_weights, tokens[:, :-1], **kwargs)  # without its no_grad
        reference_loss(logits, tokens[:, 1:], 1e-4).backward()
        return {k: w.grad for k, w in ref_weights.items()}

    return model, reference_grads


def _model_and_reference():
    cfg = OpenELMConfig(num_layers=2, model_dim=128, head_dim=32, num_gqa_groups=2, ffn_dim_divisor=32, vocab_size=2000)
    return model_and_reference_grads(cfg)


def _assert_embedding_grad(model, expected: dict) -> None:
    grad = model.transformer.token_embeddings.weight.grad.double()
    torch.testing.assert_close(grad, expected["transformer.token_embeddings.weight"], atol=4e-6, rtol=1e-4)


def _tokens(seed: int, vocab: int = 2000) -> torch.Tensor:
    # Repeated tokens, so the lookup's gradient adds several rows into one.
    return torch.randint(0, vocab // 4, (2, 65), generator=torch.Generator().manual_seed(seed))


def test_the_tied_embedding_and_head_share_one_gradient_equal_to_the_plain_ones():
    model, reference_grads = _model_and_reference()
    tokens = _tokens(1)
    logits = model(tokens[:, :-1])
    assert logits.grad_fn.name() == "_TiedHeadBackward"  # the hand-over path, not F.linear
    lm_loss(logits, tokens[:, 1:], 1e-4)[0].backward()
    expected = reference_grads(tokens)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), expected[name], atol=2e-6, rtol=1e-4, msg=name)


def test_tied_gradients_accumulate_over_micro_batches_with_a_no_grad_forward_between():
    model, reference_grads = _model_and_reference()
    for seed in (1, 2):
        tokens = _tokens(seed)
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], 1e-4)[0]
        with torch.no_grad():  # e.g. a validation forward: it must not take this step's hand-over
            model(_tokens(9)[:, :-1])
        loss.backward()
        expected = reference_grads(tokens)  # the reference accumulates too
    _assert_embedding_grad(model, expected)


def test_two_forwards_then_two_backwards_keep_each_pass_its_own_head_gradient():
    model, reference_grads = _model_and_reference()
    first, second = _tokens(1), _tokens(2)
    losses = [lm_loss(model(t[:, :-1]), t[:, 1:], 1e-4)[0] for t in (first, second)]
    losses[1].backward()
    losses[0].backward()
    for t in (first, second):
        expected = reference_grads(t)
    _assert_embedding_grad(model, expected)
