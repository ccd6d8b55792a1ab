"""The shape of a decoder-only model, as the memory plan, the speed estimate and the merge's
cost read it from its ``config.json``: widths, layers, heads, vocabulary, and the counts of
weights they give. Nothing here imports torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs from a decoder-only model's config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From a ``config.json`` as a dict (a multimodal model's ``text_config`` if it has one)."""
        text = config.get("text_config") or config
        hidden = int(text["hidden_size"])
        heads = int(text.get("num_attention_heads") or 1)
        return cls(
            hidden=hidden,
            intermediate=int(text.get("intermediate_size") or 4 * hidden),
            layers=int(text["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            vocab=int(text.get("vocab_size") or config.get("vocab_size") or 32000),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of one decoder layer's Linear modules (attention and gated MLP)."""
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes())

    def linear_rows(self) -> int:
        """Output features of all decoder Linear modules (one scale each in FP8)."""
        return self.layers * sum(b for _, b in self.linear_shapes())

    def lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (a + b) for a, b in self.linear_shapes())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
