"""Causal grouped-query attention for short sequences on CPU, its products on oneDNN.

torch's CPU flash attention multiplies small tiles through MKL, which takes its AVX2 path on AMD
processors; for OpenELM-270M's shapes (256 tokens, head_dim 64) it reached ~40 GFLOP/s per core.
At such lengths the whole score matrix of one KV head's query group fits in cache, so here each
(sequence, KV head) pair is a handful of large oneDNN products over all of its query heads at once:
per layer 1.75x as fast as flash attention on one thread and about 1.4x on two, even though the
masked half of the scores is computed too.

Layout: sequence-major, (B, S, heads, head_dim), as the QKV projection produces it and the output
projection consumes it. Within a KV head's group the query rows are ordered (position, head).
The forward keeps the softmax probabilities for the backward: heads x S x 4 bytes per token and
layer (an OpenELM-270M step at 2 x 256 tokens saves 836 MiB of activations instead of 750);
recomputing them in the backward left this no faster than flash attention on two threads.
"""

import functools

import torch

from trainer.onednn_linear import cpu_fp32_eager, onednn_fits, onednn_mm_nt

# Longer sequences go to flash attention, whose tiles skip the masked half and keep no
# probabilities: per layer on one thread this path was 1.75x as fast at 256 tokens, 1.16x at 512
# (for twice the probabilities' memory), 0.93x at 1,024.
SHORT_SEQ_MAX = 256


def short_attention_applies(q: torch.Tensor, kv_heads: int) -> bool:
    """Where `short_causal_attention` runs: eager fp32 on CPU, sequences of up to SHORT_SEQ_MAX
    tokens, and a KV head's score product large enough for oneDNN (the tiny test model's, 128
    tokens x head_dim 32, runs faster through flash attention)."""
    _, s, hq, d = q.shape
    group_scores_macs = s * (hq // kv_heads) * s * d
    return s <= SHORT_SEQ_MAX and cpu_fp32_eager(q) and onednn_fits(group_scores_macs)


def _softmax_scores_into(out: torch.Tensor, q_rows: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor):
    """out <- softmax(scale * q k^T + mask), (S*g, S) for query rows ordered (position, head).
    The softmax runs in place (torch's kernel reads each row before writing it) with its fast
    vectorised exp; a separate exp_ ran several times slower."""
    seq = k.shape[0]
    torch.add(mask, onednn_mm_nt(q_rows, k).view(seq, -1, seq), alpha=scale, out=out.view(seq, -1, seq))
    torch.ops.aten._softmax.out(out, -1, False, out=out)


class _ShortCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, s, hq, d = q.shape
        hkv = k.shape[2]
        g, scale = hq // hkv, d**-0.5
        mask = _causal_mask(s, q.device)
        # One copy puts each group's query rows next to each other, ordered (position, head).
        q_groups = q.view(b, s, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, s * g, d)
        # oneDNN reads a weight operand with strided rows through a reference kernel (~1000x
        # slower), so each KV head's keys and values get contiguous copies too.
        k, v = _heads_first(k), _heads_first(v)
        out = q.new_empty(b, s, hkv, g, d)
        probs = q.new_empty(b, hkv, s * g, s)
        for i in range(b):
            for h in range(hkv):
                _softmax_scores_into(probs[i, h], q_groups[i, h], k[i, h], scale, mask)
                out[i, :, h] = onednn_mm_nt(probs[i, h], v[i, h].t()).view(s, g, d)
        out = out.view(b, s, hq, d)
        ctx.save_for_backward(q_groups, k, v, out, probs)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q_groups, k, v, out, all_probs = ctx.saved_tensors
        b, s, hq, d = out.shape
        hkv = k.shape[1]
        g, scale = hq // hkv, d**-0.5
        # delta = rowsum(dO * O), the softmax backward's correction, per query row.
        delta = (grad_out * out).sum(-1, keepdim=True).view(b, s, hkv, g, 1).permute(0, 2, 1, 3, 4)
        grad_groups = grad_out.reshape(b, s, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, s * g, d)
        grad_q = out.new_empty(b, s, hkv, g, d)
        grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)  # (B, Hkv, S, D), as k and v here
        for i in range(b):
            for h in range(hkv):
                q_rows, go_rows = q_groups[i, h], grad_groups[i, h]
                probs = all_probs[i, h]
                # dV = P^T dO and dK = dS^T Q, each computed transposed so that oneDNN copies
                # the thin (S*g x head_dim) operand rather than the (S*g x S) one.
                grad_v[i, h] = onednn_mm_nt(go_rows.t(), probs.t()).t()
                grad_scores = onednn_mm_nt(go_rows, v[i, h]).view(s, g, s)
                grad_scores = grad_scores.sub_(delta[i, h]).view(-1, s).mul_(probs)
                grad_q[i, :, h] = onednn_mm_nt(grad_scores, k[i, h].t()).mul_(scale).view(s, g, d)
                grad_k[i, h] = onednn_mm_nt(q_rows.t(), grad_scores.t()).t().mul_(scale)
        return grad_q.view(b, s, hq, d), grad_k.transpose(1, 2), grad_v.transpose(1, 2)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> contiguous (B, H, S, D)."""
    return x.transpose(1, 2).contiguous()


@functools.lru_cache(maxsize=8)
def _causal_mask(seq: int, device: torch.device) -> torch.Tensor:
    """(S, 1, S): 0 where a position may attend, -inf above the diagonal; broadcast over a group's heads."""
    return torch.full((seq, seq), float("-inf"), device=device).triu_(1).view(seq, 1, seq)


def short_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention, q (B, S, Hq, D), k and v (B, S, Hkv, D) -> (B, S, Hq, D); query head j
    attends with KV head j // (Hq / Hkv), as F.scaled_dot_product_attention(enable_gqa=True)."""
    return _ShortCausalAttention.apply(q, k, v)
