"""Language-model loss: cross-entropy plus OpenELM's z-loss, which keeps logits from drifting large.

One autograd function computes both from the logits and writes the gradient in one pass. Autograd
over F.cross_entropy plus torch.logsumexp would keep an fp32 log-softmax of the (tokens x
vocabulary) logits, run the softmax twice and make several more full passes (a fifth of the
non-matmul time of an OpenELM-270M step on CPU).
"""

import torch


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class _LMLoss(torch.autograd.Function):
    # bf16 logits are never copied to fp32 whole: subtracting an fp32 column promotes the result.
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, z_loss_weight: float):
        m = _at_least_fp32(logits.amax(dim=-1, keepdim=True))
        exp = torch.sub(logits, m).exp_()
        sum_exp = exp.sum(dim=-1, keepdim=True)
        lse = (sum_exp.log() + m).squeeze(-1)
        ce = (lse - _at_least_fp32(logits.gather(-1, targets.unsqueeze(-1))).squeeze(-1)).mean()
        z = lse.square().mean()
        # The backward needs the softmax, exp / sum_exp. Where exp is as large as the logits (fp32
        # and float64) it is kept instead of them, which saves the backward two passes (a
        # subtraction and an exponential: ~6 ms of a two-thread OpenELM-270M step). From bf16
        # logits exp is fp32, twice their size: the backward rebuilds it from the logits instead.
        ctx.kept_exp = exp.dtype == logits.dtype
        ctx.save_for_backward(exp if ctx.kept_exp else logits, sum_exp, targets, lse)
        ctx.z_loss_weight = z_loss_weight
        return ce + z_loss_weight * z, ce

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, grad_ce: torch.Tensor):
        exp_or_logits, sum_exp, targets, lse = ctx.saved_tensors
        n = lse.numel()
        # d(ce)/dx = (softmax - onehot) / n;  d(z)/dx = 2 lse softmax / n
        g_ce = (grad_total + grad_ce) / n
        scale = (g_ce + (2 * ctx.z_loss_weight / n) * grad_total * lse).unsqueeze(-1)
        if ctx.kept_exp:
            grad = torch.mul(exp_or_logits, scale / sum_exp)  # not in place: a retained graph may run again
        else:
            grad = torch.sub(exp_or_logits, lse.unsqueeze(-1)).exp_().mul_(scale)
        grad.scatter_add_(-1, targets.unsqueeze(-1), (-g_ce).expand(n, 1))
        return grad.to(exp_or_logits.dtype), None, None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (total loss, cross-entropy), both means over tokens, computed in fp32."""
    return _LMLoss.apply(logits.flatten(0, -2), targets.flatten(), float(z_loss_weight))
