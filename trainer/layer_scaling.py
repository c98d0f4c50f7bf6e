"""OpenELM's layer-wise scaling: how many heads and how wide an FFN each layer gets.

Layer i of N gets alpha_i = round(linspace(qkv_min, qkv_max, N)[i], 2) of the
model width for its queries and beta_i (same rule) times the width for its FFN,
each rounded to a hardware-friendly multiple by `make_divisible`.
"""

from dataclasses import dataclass

import numpy as np


def make_divisible(value: float, divisor: int) -> int:
    """Round `value` to the nearest multiple of `divisor`, never going below 90% of it."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def per_layer_multipliers(lo: float, hi: float, num_layers: int) -> list[float]:
    return [round(float(v), 2) for v in np.linspace(lo, hi, num_layers, dtype=np.float64)]


@dataclass(frozen=True)
class LayerPlan:
    """Per-layer attention heads and FFN widths."""

    num_query_heads: tuple[int, ...]
    num_kv_heads: tuple[int, ...]
    ffn_dims: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.num_query_heads)


def scaled_layer_plan(
    num_layers: int,
    model_dim: int,
    head_dim: int,
    num_gqa_groups: int,
    qkv_multipliers: tuple[float, float] = (0.5, 1.0),
    ffn_multipliers: tuple[float, float] = (0.5, 4.0),
    ffn_dim_divisor: int = 256,
) -> LayerPlan:
    """The plan from OpenELM's formula (the released configs' (min, max) multipliers)."""
    q_heads = [
        make_divisible(model_dim * a, head_dim * num_gqa_groups) // head_dim
        for a in per_layer_multipliers(*qkv_multipliers, num_layers)
    ]
    ffn_dims = [
        make_divisible(model_dim * b, ffn_dim_divisor) for b in per_layer_multipliers(*ffn_multipliers, num_layers)
    ]
    return LayerPlan(tuple(q_heads), tuple(q // num_gqa_groups for q in q_heads), tuple(ffn_dims))


def explicit_layer_plan(num_query_heads, num_kv_heads, ffn_dims) -> LayerPlan:
    """A plan given layer by layer (as in a Hugging Face config.json); checks it is consistent."""
    if not (len(num_query_heads) == len(num_kv_heads) == len(ffn_dims)):
        raise ValueError(
            f"per-layer lists differ in length: num_query_heads {len(num_query_heads)}, "
            f"num_kv_heads {len(num_kv_heads)}, ffn_dims {len(ffn_dims)}"
        )
    for i, (q, kv) in enumerate(zip(num_query_heads, num_kv_heads)):
        if kv < 1 or q % kv:
            raise ValueError(f"layer {i}: {q} query heads cannot be shared by {kv} KV heads")
    return LayerPlan(tuple(map(int, num_query_heads)), tuple(map(int, num_kv_heads)), tuple(map(int, ffn_dims)))
