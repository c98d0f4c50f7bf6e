"""OpenELM for transformers (remote code; imports only torch and transformers).

A pre-norm decoder whose layers differ in width (heads and FFN size per layer).
Parameter names match Apple's published layout (transformer.layers.{i}.attn.qkv_proj, ...).
The output head is the token embedding itself (logits = x @ E^T), so there is no
lm_head parameter to tie. No KV cache: generate() re-runs the prefix each step.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_openelm import OpenELMConfig

SUPPORTED = {  # config key -> the only value this implementation computes
    "ffn_with_glu": True,
    "activation_fn_name": "swish",
    "normalization_layer_name": "rms_norm",
    "normalize_qk_projections": True,
    "share_input_output_layers": True,
}


def check_supported(config: OpenELMConfig) -> None:
    for key, value in SUPPORTED.items():
        if getattr(config, key, value) != value:
            raise ValueError(f"config.json: {key}={getattr(config, key)!r} is not supported (only {value!r})")


class OpenELMRMSNorm(nn.Module):
    """RMSNorm in fp32 with a learnable scale (the class name lets transformers' default init set it to ones)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin for rotate-half RoPE at `positions` (B, S) -> (B, 1, S, head_dim) each.

    Computed per call rather than kept as buffers: nothing to re-create after meta-device loading.
    """
    inv_freq = float(theta) ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


class OpenELMAttention(nn.Module):
    def __init__(self, config: OpenELMConfig, layer: int):
        super().__init__()
        self.q_heads, self.kv_heads = config.num_query_heads[layer], config.num_kv_heads[layer]
        self.head_dim = config.head_dim
        self.qkv_proj = nn.Linear(config.model_dim, (self.q_heads + 2 * self.kv_heads) * self.head_dim, bias=False)
        self.q_norm = OpenELMRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = OpenELMRMSNorm(self.head_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.q_heads * self.head_dim, config.model_dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None):
        b, s, _ = x.shape
        qkv = self.qkv_proj(x).view(b, s, self.q_heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.q_heads, self.kv_heads, self.kv_heads], dim=1)
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k), *rope)
        # Each KV head serves g consecutive query heads (enable_gqa's repeat_interleave order).
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.q_heads != self.kv_heads
        )
        return self.out_proj(y.transpose(1, 2).reshape(b, s, self.q_heads * self.head_dim))


class OpenELMFeedForward(nn.Module):
    """SwiGLU: proj_1's output halves are (gate, value) in that order."""

    def __init__(self, config: OpenELMConfig, layer: int):
        super().__init__()
        ffn_dim = config.ffn_dims()[layer]
        self.proj_1 = nn.Linear(config.model_dim, 2 * ffn_dim, bias=False)
        self.proj_2 = nn.Linear(ffn_dim, config.model_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.proj_1(x).chunk(2, dim=-1)
        return self.proj_2(F.silu(gate) * value)


class OpenELMDecoderLayer(nn.Module):
    def __init__(self, config: OpenELMConfig, layer: int):
        super().__init__()
        self.attn_norm = OpenELMRMSNorm(config.model_dim, config.rms_norm_eps)
        self.attn = OpenELMAttention(config, layer)
        self.ffn_norm = OpenELMRMSNorm(config.model_dim, config.rms_norm_eps)
        self.ffn = OpenELMFeedForward(config, layer)

    def forward(self, x, rope, mask):
        x = x + self.attn(self.attn_norm(x), rope, mask)
        return x + self.ffn(self.ffn_norm(x))


def positions_and_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """RoPE positions (B, S) and a boolean SDPA mask, or None when plain causal attention will do.

    With padding (0s in attention_mask), positions count only real tokens (left padding keeps
    the prompt's positions) and padded keys are hidden; each query still sees itself so no
    attention row is empty (an empty row would give NaN).
    """
    b, s = input_ids.shape
    if attention_mask is None or bool(attention_mask.all()):
        return torch.arange(s, device=input_ids.device).expand(b, s), None
    keep = attention_mask.bool()
    positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).tril()
    eye = torch.eye(s, dtype=torch.bool, device=input_ids.device)
    return positions, ((causal & keep[:, None, :]) | eye)[:, None]


class OpenELMModel(nn.Module):
    def __init__(self, config: OpenELMConfig):
        super().__init__()
        self.config = config
        self.token_embeddings = nn.Embedding(config.vocab_size, config.model_dim)
        self.layers = nn.ModuleList(OpenELMDecoderLayer(config, i) for i in range(config.num_transformer_layers))
        self.norm = OpenELMRMSNorm(config.model_dim, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        positions, mask = positions_and_mask(input_ids, attention_mask)
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_freq_constant)
        x = self.token_embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, rope, mask)
        return self.norm(x)


class OpenELMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = OpenELMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["OpenELMDecoderLayer"]

    def __init__(self, config: OpenELMConfig):
        super().__init__(config)
        check_supported(config)
        self.transformer = OpenELMModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.token_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.token_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,  # generate() passes cache/position/logits_to_keep arguments this model does not use
    ) -> CausalLMOutputWithPast:
        hidden = self.transformer(input_ids, attention_mask)
        logits = hidden @ self.transformer.token_embeddings.weight.T  # tied output head
        loss = None
        if labels is not None:  # token t predicts label t+1; -100 is ignored
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs) -> dict:
        # Without a KV cache every step needs the whole sequence, not just the newest token.
        return {"input_ids": input_ids, "attention_mask": attention_mask}

