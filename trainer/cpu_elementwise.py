"""RMSNorm, SwiGLU and RoPE with their gradients written out, for eager fp32 on CPU.

Autograd differentiates these op by op: every intermediate is another full pass over memory, and
SwiGLU's two gradient halves and RoPE's rotated halves are concatenated. Written out, each takes
fewer passes and writes its halves in place. On a two-thread CPU, where the linear products run
near the matmul peak, such passes are much of what is left of a step (bench/model_step.py,
docs/benchmarks.md: 1.3-1.7% of an OpenELM-270M step). GPUs and torch.compile use the plain expressions in trainer/model.py.
"""

import torch
import torch.nn.functional as F


class _RMSNorm(torch.autograd.Function):
    """x / rms(x) * weight over the last dimension."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # vector_norm reads x once, where x.square().mean() writes and rereads a squared copy.
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        normed = x * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return normed * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, rstd, weight = ctx.saved_tensors
        # dx = rstd * (grad * weight - normed * <grad * weight, normed> / n), and
        # <grad * weight, normed> = (grad * normed) @ weight reuses the product dweight sums.
        grad_by_normed = torch.mul(grad, normed, out=normed.new_empty(normed.shape)).view(-1, weight.numel())
        grad_w = grad_by_normed.sum(0) if ctx.needs_input_grad[1] else None
        dot = torch.mv(grad_by_normed, weight).view(rstd.shape)
        grad_x = normed * dot.div_(-weight.numel())
        grad_x.addcmul_(grad, weight).mul_(rstd)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * value, where h = (gate, value) along the last dimension."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        gate, value = h.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(gate, value, activated)
        return activated * value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, value, activated = ctx.saved_tensors
        # Both halves of dh are written where they belong: no concatenation.
        grad_h = grad.new_empty(*grad.shape[:-1], 2 * grad.shape[-1])
        grad_gate, grad_value = grad_h.chunk(2, dim=-1)
        torch.mul(grad, value, out=grad_gate)
        torch.ops.aten.silu_backward(grad_gate, gate, grad_input=grad_gate)
        torch.mul(grad, activated, out=grad_value)
        return grad_h


def swiglu(h: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(h)


class _RoPE(torch.autograd.Function):
    """Rotate-half RoPE: x * cos + cat(x_hi, x_lo) * signed_sin, with the halves added in place."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, signed_sin)
        return _rotate(x, cos, signed_sin, transpose=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, signed_sin = ctx.saved_tensors
        return _rotate(grad, cos, signed_sin, transpose=True), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    """The rotation, x * cos + swap_halves(x) * signed_sin, or with transpose=True its transpose,
    which the backward applies to the gradient: there each swapped half is multiplied by the sine
    of the half it comes from rather than of the half it lands in."""
    half = x.shape[-1] // 2
    lo, hi = slice(None, half), slice(half, None)
    out = x * cos
    out[..., lo].addcmul_(x[..., hi], signed_sin[..., hi if transpose else lo])
    out[..., hi].addcmul_(x[..., lo], signed_sin[..., lo if transpose else hi])
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    return _RoPE.apply(x, cos, signed_sin)
