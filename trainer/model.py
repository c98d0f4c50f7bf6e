"""OpenELM: a pre-norm decoder-only Transformer whose layers grow in width with depth.

Parameter names follow Apple's Hugging Face layout (transformer.layers.{i}.attn.qkv_proj, ...),
so export and import are a rename-free copy. See SPEC-openelm.md for the facts this implements.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.layer_scaling import LayerPlan, explicit_layer_plan, scaled_layer_plan


@dataclass
class OpenELMConfig:
    name: str = "openelm_tiny"
    num_layers: int = 4
    model_dim: int = 256
    head_dim: int = 32
    num_gqa_groups: int = 2
    qkv_multipliers: list[float] = field(default_factory=lambda: [0.5, 1.0])
    ffn_multipliers: list[float] = field(default_factory=lambda: [0.5, 4.0])
    ffn_dim_divisor: int = 64
    vocab_size: int = 4096
    max_context_length: int = 2048
    rope_theta: float = 10000.0
    rope_max_length: int = 4096
    norm_eps: float = 1e-6
    # Per-layer overrides (a Hugging Face config.json lists them); null = use the formula.
    num_query_heads: Optional[list[int]] = None
    num_kv_heads: Optional[list[int]] = None
    ffn_dims: Optional[list[int]] = None
    activation_checkpointing: bool = False

    def layer_plan(self) -> LayerPlan:
        explicit = (self.num_query_heads, self.num_kv_heads, self.ffn_dims)
        if all(x is not None for x in explicit):
            plan = explicit_layer_plan(*explicit)
            if plan.num_layers != self.num_layers:
                raise ValueError(f"per-layer lists have {plan.num_layers} entries but num_layers is {self.num_layers}")
            return plan
        if any(x is not None for x in explicit):
            raise ValueError("give all of num_query_heads, num_kv_heads and ffn_dims per layer, or none of them")
        return scaled_layer_plan(
            self.num_layers,
            self.model_dim,
            self.head_dim,
            self.num_gqa_groups,
            tuple(self.qkv_multipliers),
            tuple(self.ffn_multipliers),
            self.ffn_dim_divisor,
        )


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (bf16 statistics are too coarse), learnable scale, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return normed * self.weight


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with fp32 cos/sin tables, built once for rope_max_length positions."""

    def __init__(self, head_dim: int, theta: float, max_length: int):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_length, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, heads, S, head_dim)."""
        seq = x.shape[-2]
        cos, sin = self.cos[:seq], self.sin[:seq]
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (xf * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: OpenELMConfig, q_heads: int, kv_heads: int, rope: RotaryEmbedding):
        super().__init__()
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.model_dim, (q_heads + 2 * kv_heads) * cfg.head_dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.out_proj = nn.Linear(q_heads * cfg.head_dim, cfg.model_dim, bias=False)
        self.rope = rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv_proj(x).view(b, s, self.q_heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.q_heads, self.kv_heads, self.kv_heads], dim=1)
        q = self.rope(self.q_norm(q))
        k = self.rope(self.k_norm(k))
        # enable_gqa repeats each KV head for g consecutive query heads (repeat_interleave order).
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.q_heads != self.kv_heads)
        return self.out_proj(y.transpose(1, 2).reshape(b, s, self.q_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: proj_1 gives (gate, value) halves in that order."""

    def __init__(self, model_dim: int, ffn_dim: int):
        super().__init__()
        self.proj_1 = nn.Linear(model_dim, 2 * ffn_dim, bias=False)
        self.proj_2 = nn.Linear(ffn_dim, model_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.proj_1(x).chunk(2, dim=-1)
        return self.proj_2(F.silu(gate) * value)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: OpenELMConfig, q_heads: int, kv_heads: int, ffn_dim: int, rope: RotaryEmbedding):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
        self.attn = Attention(cfg, q_heads, kv_heads, rope)
        self.ffn_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg.model_dim, ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: OpenELMConfig, plan: LayerPlan):
        super().__init__()
        self.token_embeddings = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_max_length)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, q, kv, f, rope) for q, kv, f in zip(plan.num_query_heads, plan.num_kv_heads, plan.ffn_dims)
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
        for layer in self.transformer.layers:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        x = self.transformer.norm(x)
        return x @ self.transformer.token_embeddings.weight.T  # tied output head

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: OpenELMConfig, device: str | torch.device = "cpu", seed: Optional[int] = None) -> OpenELM:
    """Build with a fixed seed (same init on every rank); `device="meta"` allocates nothing."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        return OpenELM(cfg)
