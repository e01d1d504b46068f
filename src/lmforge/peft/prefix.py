"""Prefix tuning (Li & Liang 2021): trainable keys and values, per layer and key/value head, in front
of every self-attention layer's own.

Each stack gets a `PrefixTuning` as its `prefix` hook; the stack asks it once per forward for all
layers' prefixes (layers, 2, kv_heads, P, head_dim) and widens the mask so every query sees them.
They never enter the KV cache and take no positions: real tokens keep positions 0.., so cached
generation works unchanged. Li & Liang train the prefixes through an MLP over a smaller embedding
for stability (`hidden` > 0); `bake()` then stores the MLP's output as plain prefixes for inference.
Direct prefixes start as the keys/values the base computes for random vocabulary tokens, the
"real activations" initialisation the paper recommends.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.nn import TransformerStack
from lmforge.peft.core import PeftModule, freeze, method_of, record_method, require_fresh


class PrefixTuning(PeftModule):
    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, d_model: int, n_tokens: int,
                 hidden: int = 0, init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.shape = (n_layers, 2, kv_heads, n_tokens, head_dim)
        self.prefix: nn.Parameter | None = None
        self.embedding: nn.Parameter | None = None
        self.mlp: nn.Sequential | None = None
        if hidden:
            self.embedding = nn.Parameter(torch.randn(n_tokens, d_model))
            self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(),
                                     nn.Linear(hidden, n_layers * 2 * kv_heads * head_dim))
        else:
            self.prefix = nn.Parameter(init.clone() if init is not None else 0.02 * torch.randn(self.shape))

    @property
    def length(self) -> int:
        return self.shape[3]

    def forward(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.mlp is None:
            return self.prefix.to(dtype)
        layers, _, kv_heads, n_tokens, head_dim = self.shape
        out = self.mlp(self.embedding).view(n_tokens, layers, 2, kv_heads, head_dim)
        return out.permute(1, 2, 3, 0, 4).to(dtype)

    @torch.no_grad()
    def bake(self) -> None:
        """Replace the MLP by the prefixes it produces (they are all inference needs)."""
        if self.mlp is not None:
            self.prefix = nn.Parameter(self.forward())
            self.embedding = self.mlp = None


def bake_prefixes(model: nn.Module) -> nn.Module:
    """Bake every stack's MLP-parameterised prefixes into plain ones (the method record follows)."""
    for stack in self_attention_stacks(model):
        if isinstance(stack.prefix, PrefixTuning):
            stack.prefix.bake()
    method = method_of(model)
    if method is not None and method["method"] == "prefix":
        record_method(model, "prefix", {**method["options"], "hidden": 0})
    return model


def self_attention_stacks(model: nn.Module) -> list[TransformerStack]:
    return [m for m in model.modules() if isinstance(m, TransformerStack)]


@torch.no_grad()
def _real_keys_values(model: nn.Module, stack: TransformerStack, ids: torch.Tensor) -> torch.Tensor:
    """(layers, 2, kv_heads, P, head_dim): the un-rotated keys/values `stack` computes for `ids`
    (rotation at position 0 is the identity, and prefixes are never rotated)."""
    found: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        found.append(output)

    blocks = list(stack.blocks)
    handles = [b.attn.qkv.register_forward_hook(grab) for b in blocks]
    try:
        x = model.embed(ids[None])
        memory = x.new_zeros(1, 1, x.shape[-1]) if blocks[0].cross_attn is not None else None
        stack(x, memory=memory)
    finally:
        for handle in handles:
            handle.remove()
    attn = blocks[0].attn
    q, kv = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
    per_layer = [out[0].split([q, kv, kv], dim=-1)[1:] for out in found]  # (P, kv) keys, values
    return torch.stack([torch.stack([t.view(len(ids), attn.n_kv_heads, attn.head_dim).transpose(0, 1)
                                     for t in pair]) for pair in per_layer]).float()


def apply_prefix_tuning(model: nn.Module, n_tokens: int = 20, hidden: int = 0, seed: int = 0) -> nn.Module:
    """Freeze the model and give every self-attention layer (of every stack) n_tokens trainable key/value
    prefixes; hidden > 0 trains them through an MLP of that width (bake() them after training)."""
    require_fresh(model, "prefix")
    if n_tokens < 1:
        raise UserError(f"n_tokens={n_tokens} must be a positive number of prefix positions")
    if hidden < 0:
        raise UserError(f"hidden={hidden} must be >= 0 (0 = train the prefixes directly, no MLP)")
    cfg = model.cfg
    stacks = self_attention_stacks(model)
    generator = torch.Generator().manual_seed(seed)
    freeze(model)
    for stack in stacks:
        ids = torch.randint(0, cfg.vocab_size, (n_tokens,), generator=generator).to(model.embed.weight.device)
        init = None if hidden else _real_keys_values(model, stack, ids)
        prefix = PrefixTuning(len(stack.blocks), cfg.kv_heads, cfg.head_dim, cfg.d_model, n_tokens, hidden, init)
        stack.prefix = prefix.to(model.embed.weight.device)
    record_method(model, "prefix", {"n_tokens": n_tokens, "hidden": hidden, "seed": seed})
    return model
