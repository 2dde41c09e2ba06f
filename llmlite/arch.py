"""What llmlite knows of model families, in one place: where the decoder layers are, which
projections share an input (quantized together, in true-sequential order), which norm or linear
feeds which linears (what activation smoothing folds into), the key/value projections (GQA, KV
cache) and the names LoRA can target. Every other module asks here. A leaf (torch only).

Llama's layout serves Llama, Mistral, Qwen2/3, SmolLM and their kin; a model of another layout
still quantizes through the generic hook path (any ``nn.Linear`` in its decoder layers).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llmlite.errors import LlmliteError


@dataclass(frozen=True)
class Family:
    """The names of one decoder-layer layout, relative to a decoder layer."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values with this layout
    attention: str = "self_attn"
    mlp: str = "mlp"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"

    @property
    def attention_projections(self) -> tuple[str, str, str, str]:
        return self.q, self.k, self.v, self.o

    @property
    def mlp_projections(self) -> tuple[str, str, str]:
        return self.gate, self.up, self.down

    @property
    def children(self) -> set[str]:
        """A decoder layer's direct children."""
        return {self.attention, self.mlp, self.input_norm, self.post_attention_norm}

    def groups(self) -> list[list[str]]:
        """Linears that read the same input, layer-relative, in the order a layer computes them:
        q/k/v, then o, then gate/up, then down."""
        a, m = self.attention, self.mlp
        return [
            [f"{a}.{self.q}", f"{a}.{self.k}", f"{a}.{self.v}"],
            [f"{a}.{self.o}"],
            [f"{m}.{self.gate}", f"{m}.{self.up}"],
            [f"{m}.{self.down}"],
        ]

    def smoothing(self) -> list[tuple[str, list[str]]]:
        """(norm or linear, the linears it feeds): a per-channel scale on the inputs of the latter
        folds exactly into the former (AWQ, SmoothQuant). v → o maps value channels to the query
        heads that read them (GQA: one value head per group of query heads)."""
        q, o, down = self.groups()[0], self.groups()[1], self.groups()[3]
        return [
            (self.input_norm, q),
            (f"{self.attention}.{self.v}", o),
            (self.post_attention_norm, self.groups()[2]),
            (f"{self.mlp}.{self.up}", down),
        ]


LLAMA = Family("llama", ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo2"))
FAMILIES = (LLAMA,)

# Module names peft's LoRA can wrap, by family: Llama / Mistral / Qwen2, GPT-2, Phi-3's fused
# projections, GPT-NeoX / Falcon. Any of them found in a model is a default target.
LORA_TARGETS = (
    *LLAMA.attention_projections,
    *LLAMA.mlp_projections,
    "c_attn",
    "c_proj",
    "c_fc",
    "qkv_proj",
    "gate_up_proj",
    "query_key_value",
    "dense",
    "dense_h_to_4h",
    "dense_4h_to_h",
)


def family(model: nn.Module) -> Family:
    """The model's family, by its config's ``model_type``; one clear error for any other."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for known in FAMILIES:
        if model_type in known.model_types:
            return known
    names = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise LlmliteError(
        f"{model_type or type(model).__name__} models are not supported here; llmlite knows the "
        f"layout of {names}"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (the ModuleList as long as ``num_hidden_layers``)."""
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    archs = getattr(config, "architectures", None)
    name = archs[0] if archs else type(model).__name__
    raise LlmliteError(
        f"cannot find the decoder layers of {name} (no list of num_hidden_layers layers); llmlite "
        "works on decoder-only transformers (Llama, Mistral, Qwen2/3, SmolLM...)"
    )


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of each decoder layer whose attention has the Llama layout's q/k/v/o
    projections (empty when the layers have another layout)."""
    found = []
    for layer in decoder_layers(model):
        attn = getattr(layer, LLAMA.attention, None)
        if attn is None or not all(hasattr(attn, p) for p in LLAMA.attention_projections):
            return []
        found.append(attn)
    return found
