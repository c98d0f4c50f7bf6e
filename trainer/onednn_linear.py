"""fp32 linear products on CPU through oneDNN, and the tied embedding/output-head pair built on them.

Only eager fp32 on CPU takes these paths (`cpu_fp32_eager`), and not on Intel processors (below); GPUs,
autocast and torch.compile use F.linear and F.embedding. bench/model_step.py measures what each choice
here is worth.
"""

import torch
import torch.nn.functional as F


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


# fp32 matmuls on CPU go to oneDNN rather than torch's default BLAS (MKL) where both exist and the
# processor is not Intel's. MKL takes its AVX2 code path on AMD processors: on an AMD EPYC (Zen 5) it
# reached ~105 GFLOP/s per core where oneDNN's AVX-512 kernels reached ~230, on the same fp32 inputs
# (bench/model_step.py). On Intel's, MKL takes AVX-512 too, and torch's own products (MKL, plain
# autograd) made the 270M step 13% faster than these paths (docs/benchmarks.md). Products smaller
# than ONEDNN_MIN_MACS multiply-adds stay on MKL, which starts faster.
ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_CPU_MATMUL = ONEDNN_AVAILABLE and _cpu_vendor() != "GenuineIntel"
ONEDNN_MIN_MACS = 1 << 22
# The input gradient grad @ weight contracts over the layer's outputs. oneDNN runs it ~13% faster
# in blocks of this many outputs, summed, than in one product (OpenELM-270M, batch 2 x 256, AMD
# EPYC: a step's input gradients 1.48 -> 1.31 s on one thread, 0.75 -> 0.65 s on two).
ONEDNN_GRAD_INPUT_BLOCK = 512


def cpu_fp32_eager(*tensors: torch.Tensor) -> bool:
    """fp32 CPU tensors, no autocast, not under torch.compile: where the oneDNN paths apply.
    torch.compile's CPU backend picks its own kernels (and cannot lower oneDNN's linear op)."""
    return (
        not torch.compiler.is_compiling()
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not torch.is_autocast_enabled("cpu")
    )


def onednn_mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T (a: (..., k), b: (n, k)) by oneDNN's fp32 matmul."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def onednn_grad_input(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad @ weight (grad: (..., n_out), weight: (n_out, n_in)), in blocks of ONEDNN_GRAD_INPUT_BLOCK
    outputs. A block of weight rows, transposed, is a strided view oneDNN reads as is; a block of
    columns would not be (it falls back to a reference kernel hundreds of times slower)."""
    block, grad = ONEDNN_GRAD_INPUT_BLOCK, grad.contiguous()
    out = onednn_mm_nt(grad[..., :block], weight[:block].t())
    for start in range(block, weight.shape[0], block):
        out += onednn_mm_nt(grad[..., start : start + block], weight[start : start + block].t())
    return out


def onednn_grad_weight(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad^T @ x (grad: (..., n_out), x: (..., n_in)), the weight gradient, summed over tokens.

    oneDNN copies its first operand into a contiguous one: either grad^T (out x tokens), or x^T
    (in x tokens) and then the transposed result (out x in). This takes whichever copies less.
    """
    g, x = grad.flatten(0, -2), x.flatten(0, -2)
    (tokens, n_out), n_in = g.shape, x.shape[1]
    if n_in * (tokens + n_out) < n_out * tokens:
        return onednn_mm_nt(x.t(), g.t()).t().contiguous()
    return onednn_mm_nt(g.t(), x.t())


class _OneDNNLinear(torch.autograd.Function):
    """x @ weight.T with its two backward products on oneDNN as well."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return onednn_mm_nt(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = onednn_grad_input(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = onednn_grad_weight(grad, x) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def onednn_fits(macs: int) -> bool:
    """Whether a product of this many multiply-adds goes to oneDNN (where it exists)."""
    return ONEDNN_CPU_MATMUL and macs >= ONEDNN_MIN_MACS


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T: F.linear, except fp32 on CPU in eager mode, where large products use oneDNN."""
    if cpu_fp32_eager(x, weight) and onednn_fits(x.numel() // x.shape[-1] * weight.numel()):
        return _OneDNNLinear.apply(x, weight)
    return F.linear(x, weight)


# ----------------------------------------------------------------------------- tied embedding
# A weight used twice gets two gradients that autograd sums before storing: the output head's
# (dense, from a matmul) and the lookup's, which F.embedding builds as a zero-filled
# vocab x d tensor with the batch's rows added (for OpenELM-270M: zeroing 164 MB, then adding
# 164 MB into the head's; a sparse gradient is no cheaper, autograd adds it out of place). Here
# the head's backward hands its weight gradient over, and the lookup's backward, which autograd
# runs last (every other gradient flows through its output), adds the batch's rows into it.


class GradHandOver:
    """Carries the output head's weight gradient from its backward to the lookup's."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad = None


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: torch.Tensor, weight: torch.Tensor, hand_over: GradHandOver) -> torch.Tensor:
        ctx.save_for_backward(tokens)
        ctx.hand_over, ctx.weight_shape = hand_over, weight.shape
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (tokens,) = ctx.saved_tensors
        grad_w, ctx.hand_over.grad = ctx.hand_over.grad, None
        if grad_w is None:  # the head's gradient did not reach this pass
            grad_w = grad.new_zeros(ctx.weight_shape)
        grad_w.index_add_(0, tokens.flatten(), grad.flatten(0, -2))
        return None, grad_w, None


class _TiedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, hand_over: GradHandOver) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.hand_over = hand_over
        return onednn_mm_nt(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        ctx.hand_over.grad = onednn_grad_weight(grad, x)
        return onednn_grad_input(grad, weight), None, None


def tied_lookup(tokens: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, GradHandOver | None]:
    """weight[tokens], and the hand-over to give `tied_head` in the same forward (None: plain path)."""
    training = torch.is_grad_enabled() and weight.requires_grad
    if training and cpu_fp32_eager(weight) and onednn_fits(tokens.numel() * weight.numel()):
        hand_over = GradHandOver()
        return _TiedLookup.apply(tokens, weight, hand_over), hand_over
    return F.embedding(tokens, weight), None


def tied_head(x: torch.Tensor, weight: torch.Tensor, hand_over: GradHandOver | None) -> torch.Tensor:
    """x @ weight.T, the output head over the embedding `tied_lookup` read in the same forward."""
    if hand_over is None:
        return linear(x, weight)
    return _TiedHead.apply(x, weight, hand_over)
