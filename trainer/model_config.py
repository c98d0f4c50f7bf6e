"""The model's configuration and, from it, the per-layer plan (heads and FFN widths). Imports no torch:
the command line composes and checks configs without paying for it."""

from dataclasses import dataclass, field
from typing import Optional

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

    def architecture_differences(self, other: "OpenELMConfig", label: str, shapes_only: bool = False) -> list[str]:
        """What of the architecture (shapes_only: of the weights' shapes) `other` has otherwise, as
        "key theirs (label: ours)"."""
        keys = {"layers": "num_layers", "model_dim": "model_dim", "head_dim": "head_dim", "vocab_size": "vocab_size"}
        if not shapes_only:
            keys.update(max_context_length="max_context_length", rope_theta="rope_theta",
                        rope_max_length="rope_max_length", norm_eps="norm_eps")
        found = [f"{key} {getattr(other, attr)} ({label}: {getattr(self, attr)})" for key, attr in keys.items()
                 if getattr(other, attr) != getattr(self, attr)]
        if not found and other.layer_plan() != self.layer_plan():
            found.append(f"per-layer heads or FFN widths ({label} scales its layers otherwise)")
        return found

    def architecture(self) -> tuple:
        """What the weights' shapes and the computation depend on: two configs with the same architecture
        describe one model, whether their layers are listed one by one (a Hugging Face config) or scaled."""
        return (self.num_layers, self.model_dim, self.head_dim, self.vocab_size, self.max_context_length,
                self.rope_theta, self.rope_max_length, self.norm_eps, self.layer_plan())
