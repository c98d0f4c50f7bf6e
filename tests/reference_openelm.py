"""Reference OpenELM forward pass, written from SPEC-openelm.md alone.

A deliberately plain, unoptimised test oracle: every step is spelled out in
fp32 (no fused kernels, no scaled_dot_product_attention, no F.rms_norm) so
that the real model can be checked against it.
"""
import math

import numpy as np
import torch


# --------------------------------------------------------------------------
# Layer-wise scaling
# --------------------------------------------------------------------------
def _make_divisible(v, div):
    # Exactly as in the SPEC: round to nearest multiple, never drop >10%.
    new = max(div, int(v + div / 2) // div * div)
    if new < 0.9 * v:
        new += div
    return new


def reference_layer_plan(num_layers, model_dim, head_dim, num_gqa_groups,
                         qkv_multipliers=(0.5, 1.0), ffn_multipliers=(0.5, 4.0),
                         ffn_dim_divisor=256):
    # numpy float64 linspace then Python round(x, 2), as the SPEC says.
    alphas = [round(float(a), 2) for a in
              np.linspace(qkv_multipliers[0], qkv_multipliers[1], num_layers, dtype=np.float64)]
    betas = [round(float(b), 2) for b in
             np.linspace(ffn_multipliers[0], ffn_multipliers[1], num_layers, dtype=np.float64)]
    q_heads = [_make_divisible(model_dim * a, head_dim * num_gqa_groups) // head_dim for a in alphas]
    kv_heads = [q // num_gqa_groups for q in q_heads]
    ffn_dims = [_make_divisible(model_dim * b, ffn_dim_divisor) for b in betas]
    return {"num_query_heads": q_heads, "num_kv_heads": kv_heads, "ffn_dims": ffn_dims}


# --------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------
def _rms_norm(x, weight, eps):
    # Written out by hand, in fp32.
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()


def _rotate_half(x):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def _rope_cos_sin(seq_len, head_dim, theta):
    # inv_freq_i = theta^(-2i/hd), i = 0 .. hd/2 - 1, in fp32.
    i = torch.arange(0, head_dim // 2, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (2.0 * i / head_dim))
    pos = torch.arange(seq_len, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]          # (S, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)           # (S, hd) rotate-half layout
    return torch.cos(emb), torch.sin(emb)


def _attention(x, sd, p, n_q, n_kv, head_dim, cos, sin, eps):
    B, S, _ = x.shape
    qkv = x @ sd[p + "attn.qkv_proj.weight"].float().T
    qkv = qkv.view(B, S, n_q + 2 * n_kv, head_dim)
    # Split by heads: first q heads queries, next kv keys, last kv values.
    q = qkv[:, :, :n_q]
    k = qkv[:, :, n_q:n_q + n_kv]
    v = qkv[:, :, n_q + n_kv:]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd)

    # Per-head RMSNorm on q and k, before RoPE.
    q = _rms_norm(q, sd[p + "attn.q_norm.weight"], eps)
    k = _rms_norm(k, sd[p + "attn.k_norm.weight"], eps)

    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin

    # GQA: KV head j serves query heads j*g .. j*g+g-1 (repeat_interleave order).
    g = n_q // n_kv
    k = torch.repeat_interleave(k, g, dim=1)
    v = torch.repeat_interleave(v, g, dim=1)

    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    mask = torch.triu(torch.full((S, S), float("-inf")), diagonal=1)
    probs = torch.softmax(scores + mask, dim=-1)
    out = probs @ v                                   # (B, H, S, hd)
    out = out.transpose(1, 2).reshape(B, S, n_q * head_dim)
    return out @ sd[p + "attn.out_proj.weight"].float().T


def _ffn(x, sd, p, ffn_dim):
    h = x @ sd[p + "ffn.proj_1.weight"].float().T
    a, b = h[..., :ffn_dim], h[..., ffn_dim:]         # halves (a, b), in that order
    return (torch.nn.functional.silu(a) * b) @ sd[p + "ffn.proj_2.weight"].float().T


@torch.no_grad()
def reference_logits(state_dict, tokens, *, model_dim, head_dim, num_query_heads,
                     num_kv_heads, ffn_dims, rope_theta=10000.0, norm_eps=1e-6):
    sd = state_dict
    emb = sd["transformer.token_embeddings.weight"].float()
    assert emb.shape[1] == model_dim
    x = emb[tokens]                                   # (B, S, d)
    cos, sin = _rope_cos_sin(tokens.shape[1], head_dim, rope_theta)
    for i, (n_q, n_kv, f) in enumerate(zip(num_query_heads, num_kv_heads, ffn_dims)):
        p = f"transformer.layers.{i}."
        # Pre-norm residual blocks.
        x = x + _attention(_rms_norm(x, sd[p + "attn_norm.weight"], norm_eps),
                           sd, p, n_q, n_kv, head_dim, cos, sin, norm_eps)
        x = x + _ffn(_rms_norm(x, sd[p + "ffn_norm.weight"], norm_eps), sd, p, f)
    x = _rms_norm(x, sd["transformer.norm.weight"], norm_eps)
    return x @ emb.T                                  # tied output head


# --------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------
def reference_loss(logits, targets, z_loss_weight=1e-4):
    logits = logits.float()
    m = logits.max(dim=-1, keepdim=True).values
    lse = (m + torch.log(torch.exp(logits - m).sum(dim=-1, keepdim=True))).squeeze(-1)
    log_probs = logits - lse.unsqueeze(-1)
    ce = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean()
    return ce + z_loss_weight * (lse ** 2).mean()


# --------------------------------------------------------------------------
# Random weights
# --------------------------------------------------------------------------
def random_state_dict(vocab_size, model_dim, head_dim, num_query_heads, num_kv_heads,
                      ffn_dims, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def lin(out_f, in_f):
        return torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5

    def norm(n):
        # Not all ones, so a missing or misplaced norm changes the output.
        return 1.0 + 0.2 * torch.randn(n, generator=gen)

    sd = {"transformer.token_embeddings.weight":
          torch.randn(vocab_size, model_dim, generator=gen) * model_dim ** -0.5}
    for i, (n_q, n_kv, f) in enumerate(zip(num_query_heads, num_kv_heads, ffn_dims)):
        p = f"transformer.layers.{i}."
        sd[p + "attn_norm.weight"] = norm(model_dim)
        sd[p + "attn.qkv_proj.weight"] = lin((n_q + 2 * n_kv) * head_dim, model_dim)
        sd[p + "attn.q_norm.weight"] = norm(head_dim)
        sd[p + "attn.k_norm.weight"] = norm(head_dim)
        sd[p + "attn.out_proj.weight"] = lin(model_dim, n_q * head_dim)
        sd[p + "ffn_norm.weight"] = norm(model_dim)
        sd[p + "ffn.proj_1.weight"] = lin(2 * f, model_dim)
        sd[p + "ffn.proj_2.weight"] = lin(model_dim, f)
    sd["transformer.norm.weight"] = norm(model_dim)
    return sd


def reference_kwargs(model) -> dict:
    """Keyword arguments of `reference_logits` for elmforge's OpenELM `model` (its config and layer plan)."""
    cfg, plan = model.cfg, model.plan
    return dict(
        model_dim=cfg.model_dim,
        head_dim=cfg.head_dim,
        num_query_heads=list(plan.num_query_heads),
        num_kv_heads=list(plan.num_kv_heads),
        ffn_dims=list(plan.ffn_dims),
        rope_theta=cfg.rope_theta,
        norm_eps=cfg.norm_eps,
    )


# --------------------------------------------------------------------------
# Self-check
# --------------------------------------------------------------------------
def _param_count(vocab, d, hd, plan):
    n = vocab * d + d  # tied embedding + final norm
    for q, kv, f in zip(plan["num_query_heads"], plan["num_kv_heads"], plan["ffn_dims"]):
        n += 2 * d + 2 * hd + d * (q + 2 * kv) * hd + q * hd * d + d * 2 * f + f * d
    return n


if __name__ == "__main__":
    plan = reference_layer_plan(16, 1280, 64, 4)
    print("270M plan:", plan)
    assert plan["num_query_heads"] == [12] * 5 + [16] * 7 + [20] * 4, plan["num_query_heads"]
    assert plan["num_kv_heads"] == [q // 4 for q in plan["num_query_heads"]]
    assert plan["ffn_dims"][0] == 768 and plan["ffn_dims"][-1] == 5120, plan["ffn_dims"]
    assert plan["ffn_dims"] == sorted(plan["ffn_dims"])
    n = _param_count(32000, 1280, 64, plan)
    print("270M params:", n)
    assert n == 271_527_168, n

    # Tiny forward/loss smoke test: shapes, finiteness, causality.
    small = reference_layer_plan(3, 64, 16, 2, ffn_dim_divisor=16)
    kw = dict(model_dim=64, head_dim=16, num_query_heads=small["num_query_heads"],
              num_kv_heads=small["num_kv_heads"], ffn_dims=small["ffn_dims"])
    sd = random_state_dict(100, seed=1, **kw)
    toks = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    logits = reference_logits(sd, toks, **kw)
    assert logits.shape == (2, 9, 100) and torch.isfinite(logits).all()
    toks2 = toks.clone()
    toks2[:, -1] = (toks2[:, -1] + 1) % 100
    assert torch.allclose(reference_logits(sd, toks2, **kw)[:, :-1], logits[:, :-1])
    loss = reference_loss(logits, toks)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 100), toks.reshape(-1))
    z = torch.logsumexp(logits, -1).pow(2).mean()
    assert torch.allclose(loss, ce + 1e-4 * z, atol=1e-6)
    print("small plan:", small, "loss:", loss.item())
    print("self-check OK")
