"""OpenELM for transformers (remote code; imports only torch and transformers).

A pre-norm decoder whose layers differ in width (heads and FFN size per layer).
Parameter names match Apple's published layout (transformer.layers.{i}.attn.qkv_proj, ...).
The output head is the token embedding itself (logits = x @ E^T), so there is no
lm_head parameter to tie. generate() keeps each layer's keys and values in transformers'
cache, which transformers 5 passes as `cache` and 4.x as `past_key_values`.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_openelm import OpenELMConfig

SUPPORTED = {  # config key -> the only value this implementation computes
    "ffn_with_glu": True,
    "activation_fn_name": "swish",
    "normalization_layer_name": "rms_norm",
    "normalize_qk_projections": True,
    "share_input_output_layers": True,
}
# The output's field for the cache: `cache` from transformers 5, `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


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
        self.layer = layer
        self.q_heads, self.kv_heads = config.num_query_heads[layer], config.num_kv_heads[layer]
        self.head_dim = config.head_dim
        self.qkv_proj = nn.Linear(config.model_dim, (self.q_heads + 2 * self.kv_heads) * self.head_dim, bias=False)
        self.q_norm = OpenELMRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = OpenELMRMSNorm(self.head_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.q_heads * self.head_dim, config.model_dim, bias=False)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, cache: Cache | None):
        b, s, _ = x.shape
        qkv = self.qkv_proj(x).view(b, s, self.q_heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.q_heads, self.kv_heads, self.kv_heads], dim=1)
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k), *rope)
        if cache is not None:  # keys and values of every position so far, these included
            k, v = cache.update(k, v, self.layer)
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

    def forward(self, x, rope, mask, cache=None):
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


def positions_and_mask(
    b: int, s: int, past: int, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
    device: torch.device,
):
    """RoPE positions (B, S) of S new tokens after `past` cached ones, and a boolean SDPA mask
    (B, 1, S, past + S), or None when plain causal attention from position 0 will do.

    Without position_ids, positions count only real tokens (0s in attention_mask, which covers the
    cached tokens too, are padding), so left padding keeps the prompt's positions. position_ids, when
    given, are used as they are; where they do not go up by one a new sequence starts (several packed
    in one row, as padding-free collators make them) and attention stays within each, as transformers'
    own models do. Padded keys are hidden; each query still sees itself so no attention row is empty
    (an empty row would give NaN).
    """
    total = past + s
    if attention_mask is not None and attention_mask.shape[-1] != total:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions; the cache holds {past} "
                         f"and the input adds {s}, so it must cover {total}")
    padded = attention_mask is not None and not bool(attention_mask.all())
    keep = attention_mask.bool() if padded else None
    sequence = None  # (B, S): which packed sequence each token belongs to, where there are several
    if position_ids is not None:
        if position_ids.shape[-1] != s:
            raise ValueError(f"position_ids cover {position_ids.shape[-1]} positions; the input has {s}")
        positions = position_ids.to(device).expand(b, s)
        starts = positions[:, 1:] != positions[:, :-1] + 1
        if padded:  # a pad's position is any number (generate gives pads 1): only real neighbours start one
            new = keep[:, past:]
            starts = starts & new[:, 1:] & new[:, :-1]
        if bool(starts.any()):
            if past:  # which cached tokens belong to which sequence is not known
                raise ValueError(f"position_ids restart within the input (packed sequences) while the cache holds "
                                 f"{past} tokens: pass packed sequences without a cache (use_cache=False)")
            sequence = F.pad(starts.long(), (1, 0)).cumsum(-1)
    elif padded:
        positions = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    else:
        positions = torch.arange(past, total, device=device).expand(b, s)
    if past == 0 and not padded and sequence is None:
        return positions, None
    query = torch.arange(past, total, device=device)[:, None]
    key = torch.arange(total, device=device)
    mask = (key <= query).expand(b, s, total)
    if padded:
        mask = mask & keep[:, None, :]
    if sequence is not None:  # nothing cached: keys and queries are the same tokens
        mask = mask & (sequence[:, :, None] == sequence[:, None, :])
    return positions, (mask | (key == query))[:, None]


class OpenELMModel(nn.Module):
    def __init__(self, config: OpenELMConfig):
        super().__init__()
        self.config = config
        self.token_embeddings = nn.Embedding(config.vocab_size, config.model_dim)
        self.layers = nn.ModuleList(OpenELMDecoderLayer(config, i) for i in range(config.num_transformer_layers))
        self.norm = OpenELMRMSNorm(config.model_dim, config.rms_norm_eps)
        self.gradient_checkpointing = False  # gradient_checkpointing_enable() sets this and the function below

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
        cache: Cache | None, output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Final hidden states of the embedded tokens x (B, S, model_dim) and, with output_hidden_states,
        every layer's: as transformers' LlamaModel, x itself, then each layer's output, the last one
        after the final norm (the same tensor as the first one returned)."""
        past = cache.get_seq_length() if cache is not None else 0
        positions, mask = positions_and_mask(x.shape[0], x.shape[1], past, attention_mask, position_ids, x.device)
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_freq_constant)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        states = [x] if output_hidden_states else None
        for layer in self.layers:
            if recompute:  # the backward runs the layer again rather than keeping its activations
                x = self._gradient_checkpointing_func(layer.__call__, x, rope, mask)
            else:
                x = layer(x, rope, mask, cache)
            if states is not None:
                states.append(x)
        x = self.norm(x)
        if states is None:
            return x, None
        states[-1] = x
        return x, tuple(states)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of token t's logits against label t+1, labels -100 ignored: the mean over the
    counted labels or, given num_items_in_batch, their sum divided by it.

    transformers' Trainer passes num_items_in_batch (the counted labels of all the micro-batches
    accumulated into one step) and then does not divide by the accumulation steps itself, as it sees
    that forward takes **kwargs; the mean would make the gradients that many times too large.
    """
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                           ignore_index=-100, reduction=reduction)
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):  # counted on another device, maybe
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class OpenELMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = OpenELMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["OpenELMDecoderLayer"]
    supports_gradient_checkpointing = True
    _supports_cache_class = True  # transformers 4.x: generate() gives a DynamicCache, not tuples
    # The layers call scaled_dot_product_attention whatever attn_implementation says; this lets
    # from_pretrained accept "sdpa" (and make it the default) rather than refuse it.
    _supports_sdpa = True

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
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        position_ids: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,  # what else transformers passes (return_dict, ...): nothing here depends on it
    ) -> CausalLMOutputWithPast:
        """Logits (B, S, vocab) of input_ids (B, S) or inputs_embeds (B, S, model_dim); `loss` with labels.

        With use_cache (config.use_cache by default; never while training), the keys and values are
        kept in `cache` (a transformers Cache; one is made when none is given) and returned, so the
        next call passes only the new tokens, with attention_mask covering the cached ones too.
        position_ids (B or 1, S) replace the positions otherwise counted from the cache and
        attention_mask; see positions_and_mask for packed sequences.
        logits_to_keep=k computes the logits of the last k positions only (0: all); the loss still
        covers every position.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if self.config.output_attentions if output_attentions is None else output_attentions:
            raise ValueError("output_attentions=True: OpenELM has no attention weights to return (its layers call "
                             "scaled_dot_product_attention, which does not give them)")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, DynamicCache):  # a static cache's keys have a fixed length
            raise ValueError(f"cache: only transformers' DynamicCache is supported, not {type(cache).__name__}")
        use_cache = (self.config.use_cache if use_cache is None else use_cache) and not self.training
        if use_cache and cache is None:
            cache = DynamicCache()
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        x = self.transformer.token_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        hidden, hidden_states = self.transformer(
            x, attention_mask, position_ids, cache if use_cache else None, output_hidden_states
        )
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            kept = hidden[:, logits_to_keep]
        logits = self._logits(kept)
        loss = None
        if labels is not None:  # labels cover the whole input, so the loss needs every position's logits
            loss = causal_lm_loss(logits if kept is hidden else self._logits(hidden), labels, num_items_in_batch)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=hidden_states, **{CACHE_FIELD: cache if use_cache else None}
        )

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.transformer.token_embeddings.weight.T  # tied output head

