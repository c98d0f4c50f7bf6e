"""OpenELM: a pre-norm decoder-only Transformer whose layers grow in width with depth.

Parameter names follow Apple's Hugging Face layout (transformer.layers.{i}.attn.qkv_proj, ...),
so export and import are a rename-free copy. The facts it implements are those of the OpenELM paper
(Mehta et al., 2024, arXiv:2404.14619) and Apple's released configs.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.cpu_attention import short_attention_applies, short_causal_attention
from trainer.cpu_elementwise import rms_norm, rope, swiglu
from trainer.layer_scaling import LayerPlan
from trainer.model_config import OpenELMConfig
from trainer.onednn_linear import cpu_fp32_eager, linear, tied_head, tied_lookup


class Linear(nn.Linear):
    """nn.Linear (no bias) whose forward goes through `linear`; still a module, so hooks (ZeRO-3) see it."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (bf16 statistics are too coarse), learnable scale, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_fp32_eager(x, self.weight):
            return rms_norm(x, self.weight, self.eps)
        # Normalise in fp32, round to x's dtype, then scale (as the Hugging Face release does).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return normed * self.weight


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, signed sin), each (seq_len, 1, head_dim) to broadcast over heads, for rotate-half
    RoPE with inv_freq = theta^(-2i/hd).

    rotate_half(x) * sin == cat(x2, x1) * cat(-sin, sin), so the sign lives in the table. Built once
    per forward and shared by the layers; computed, not stored, so it stays fp32 when the module is cast
    to bf16.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    sin = angles.sin()
    cos, signed_sin = torch.cat([angles, angles], dim=-1).cos(), torch.cat([-sin, sin], dim=-1)
    return cos.unsqueeze(1), signed_sin.unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x (B, S, heads, head_dim), in fp32: x * cos + rotate_half(x) * sin."""
    if cpu_fp32_eager(x):
        return rope(x, cos, signed_sin)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.addcmul(xf * cos, torch.cat([x2, x1], dim=-1), signed_sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: OpenELMConfig, q_heads: int, kv_heads: int):
        super().__init__()
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.model_dim, (q_heads + 2 * kv_heads) * cfg.head_dim)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.out_proj = Linear(q_heads * cfg.head_dim, cfg.model_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Sequence-major (B, S, heads, head_dim) throughout, as the projections lay it out.
        b, s, _ = x.shape
        qkv = self.qkv_proj(x).view(b, s, self.q_heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.split([self.q_heads, self.kv_heads, self.kv_heads], dim=2)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        if short_attention_applies(q, self.kv_heads):
            y = short_causal_attention(q, k, v)
        else:
            # enable_gqa repeats each KV head for g consecutive query heads (repeat_interleave order).
            gqa = self.q_heads != self.kv_heads
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=gqa
            ).transpose(1, 2)
        return self.out_proj(y.reshape(b, s, self.q_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: proj_1 gives (gate, value) halves in that order."""

    def __init__(self, model_dim: int, ffn_dim: int):
        super().__init__()
        self.proj_1 = Linear(model_dim, 2 * ffn_dim)
        self.proj_2 = Linear(ffn_dim, model_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_1(x)
        if cpu_fp32_eager(h):
            return self.proj_2(swiglu(h))
        gate, value = h.chunk(2, dim=-1)
        return self.proj_2(F.silu(gate) * value)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: OpenELMConfig, q_heads: int, kv_heads: int, ffn_dim: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
        self.attn = Attention(cfg, q_heads, kv_heads)
        self.ffn_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg.model_dim, ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class TiedEmbedding(nn.Embedding):
    """The token embedding, whose weight is also the output head (OpenELM ties them): `forward`
    looks tokens up, `head` projects onto the vocabulary. In eager fp32 on CPU the two share one
    weight gradient instead of summing two (trainer.onednn_linear)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__(vocab_size, dim)
        self._hand_over = None  # from this forward's lookup to its head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, self._hand_over = tied_lookup(tokens, self.weight)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        hand_over, self._hand_over = self._hand_over, None
        return tied_head(x, self.weight, hand_over)


class Transformer(nn.Module):
    def __init__(self, cfg: OpenELMConfig, plan: LayerPlan):
        super().__init__()
        self.token_embeddings = TiedEmbedding(cfg.vocab_size, cfg.model_dim)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, q, kv, f) for q, kv, f in zip(plan.num_query_heads, plan.num_kv_heads, plan.ffn_dims)
        )
        self.norm = RMSNorm(cfg.model_dim, cfg.norm_eps)


class OpenELM(nn.Module):
    """forward(tokens (B, S) int64) -> logits (B, S, vocab)."""

    def __init__(self, cfg: OpenELMConfig):
        super().__init__()
        self.cfg = cfg
        self.plan = cfg.layer_plan()
        self.transformer = Transformer(cfg, self.plan)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """OpenELM init: N(0, fan_in^-0.5) linears, N(0, d^-0.5) embeddings, residual outputs scaled by (2N)^-0.5."""
        d, n = self.cfg.model_dim, self.cfg.num_layers
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=module.in_features**-0.5)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=d**-0.5)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for layer in self.transformer.layers:
            for proj in (layer.attn.out_proj, layer.ffn.proj_2):
                nn.init.normal_(proj.weight, std=d**-0.5 * (2 * n) ** -0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        if seq > self.cfg.rope_max_length:
            raise ValueError(f"sequence of {seq} tokens exceeds rope_max_length {self.cfg.rope_max_length}")
        x = self.transformer.token_embeddings(tokens)
        cos, sin = rope_tables(seq, self.cfg.head_dim, self.cfg.rope_theta, tokens.device)
        for layer in self.transformer.layers:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        x = self.transformer.norm(x)
        return self.transformer.token_embeddings.head(x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: OpenELMConfig, device: str | torch.device = "cpu", seed: Optional[int] = None) -> OpenELM:
    """Build with a fixed seed (same init on every rank); `device="meta"` allocates nothing."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        return OpenELM(cfg)
