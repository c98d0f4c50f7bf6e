"""OpenELM configuration for transformers (remote code: self-contained, so make_divisible is repeated here).

Field names follow Apple's released config.json. The per-layer lists are authoritative:
layer i has num_query_heads[i] / num_kv_heads[i] heads and an FFN of
make_divisible(ffn_multipliers[i] * model_dim, ffn_dim_divisor).
"""

from transformers import PretrainedConfig


def make_divisible(value: float, divisor: int) -> int:
    """Nearest multiple of `divisor`, never below 90% of `value` (OpenELM's rounding rule)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class OpenELMConfig(PretrainedConfig):
    model_type = "openelm"
    # The generic names other tools look up (layers vary in heads, so there is no single head count).
    attribute_map = {"num_hidden_layers": "num_transformer_layers", "hidden_size": "model_dim"}

    def __init__(
        self,
        vocab_size: int = 32000,
        max_context_length: int = 2048,
        num_transformer_layers: int = 16,
        model_dim: int = 1280,
        head_dim: int = 64,
        num_gqa_groups: int = 4,
        num_query_heads: list[int] | None = None,
        num_kv_heads: list[int] | None = None,
        qkv_multipliers: list[float] | None = None,
        ffn_multipliers: list[float] | None = None,
        ffn_dim_divisor: int = 256,
        ffn_with_glu: bool = True,
        activation_fn_name: str = "swish",
        normalization_layer_name: str = "rms_norm",
        normalize_qk_projections: bool = True,
        share_input_output_layers: bool = True,
        rope_freq_constant: float = 10000,
        rope_max_length: int = 4096,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_context_length = max_context_length
        self.num_transformer_layers = num_transformer_layers
        self.model_dim = model_dim
        self.head_dim = head_dim
        self.num_gqa_groups = num_gqa_groups
        self.num_query_heads = num_query_heads
        self.num_kv_heads = num_kv_heads
        self.qkv_multipliers = qkv_multipliers
        self.ffn_multipliers = ffn_multipliers
        self.ffn_dim_divisor = ffn_dim_divisor
        self.ffn_with_glu = ffn_with_glu
        self.activation_fn_name = activation_fn_name
        self.normalization_layer_name = normalization_layer_name
        self.normalize_qk_projections = normalize_qk_projections
        self.share_input_output_layers = share_input_output_layers
        self.rope_freq_constant = rope_freq_constant
        self.rope_max_length = rope_max_length
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache  # generate() keeps the keys and values rather than re-running the prefix
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    def ffn_dims(self) -> list[int]:
        return [make_divisible(m * self.model_dim, self.ffn_dim_divisor) for m in self.ffn_multipliers]
