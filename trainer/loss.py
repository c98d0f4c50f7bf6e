"""Language-model loss: cross-entropy plus OpenELM's z-loss, which keeps logits from drifting large."""

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (total loss, cross-entropy), both means over tokens, computed in fp32."""
    logits = logits.float().flatten(0, -2)
    targets = targets.flatten()
    ce = F.cross_entropy(logits, targets)
    if not z_loss_weight:
        return ce, ce
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return ce + z_loss_weight * z, ce
