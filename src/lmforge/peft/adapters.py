"""Bottleneck adapters (Houlsby et al. 2019) and selective fine-tuning (BitFit, named layers).

An adapter is y + up(act(down(y))) on a sublayer's output y, before the residual add; `up` starts at
zero so the model starts exactly at the base. Each block gets one after its attention and one after
its MLP, attached as `.adapter` and applied by a forward hook, so base weights keep their names.
BitFit (Ben Zaken et al. 2022) trains only the bias terms; `apply_selective` trains named parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.nn import Block
from lmforge.nn.mlp import ACTIVATIONS
from lmforge.peft.core import PeftModule, add_hook, as_list, freeze, record_method, require_fresh, unfreeze


class BottleneckAdapter(PeftModule):
    def __init__(self, d_model: int, bottleneck: int, activation: str = "gelu") -> None:
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        self.activation = activation
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # near-identity start (exactly the identity until up moves)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(ACTIVATIONS[self.activation](self.down(y)))


def _adapter_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    return None if module.adapter.disabled else module.adapter(output)


def apply_adapters(model: nn.Module, bottleneck: int | None = None, activation: str = "gelu") -> nn.Module:
    """Freeze the model and add a trainable bottleneck adapter after every block's attention and MLP.
    bottleneck defaults to d_model/16 (at least 1)."""
    require_fresh(model, "adapter")
    if activation not in ACTIVATIONS:
        raise UserError(f"adapter activation '{activation}' is unknown; choose one of: {', '.join(ACTIVATIONS)}")
    d_model = model.cfg.d_model
    size = bottleneck or max(1, d_model // 16)
    if size < 1:
        raise UserError(f"adapter bottleneck={bottleneck} must be a positive width (default d_model/16)")
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    freeze(model)
    device = model.embed.weight.device
    for block in blocks:
        for sublayer in (block.attn, block.mlp):
            sublayer.adapter = BottleneckAdapter(d_model, size, activation).to(device)
            add_hook(sublayer, _adapter_hook)
    record_method(model, "adapter", {"bottleneck": size, "activation": activation})
    return model


def apply_bitfit(model: nn.Module) -> nn.Module:
    """Freeze everything but the bias terms (attention, MLP and norm biases)."""
    require_fresh(model, "bitfit")
    biases = [name for name, _ in model.named_parameters() if name.endswith("bias")]
    if not biases:
        raise UserError("this model has no bias parameters (attention_bias/mlp_bias/norm_bias are off, as in "
                        "Llama); BitFit needs biases, so choose another method such as lora")
    freeze(model)
    unfreeze(model, ["*bias"])
    record_method(model, "bitfit", {})
    return model


def apply_selective(model: nn.Module, patterns: Iterable[str] | str) -> nn.Module:
    """Freeze everything but the parameters the patterns name (`lm_head`, `decoder.blocks.3`, `*.bias`)."""
    require_fresh(model, "selective")
    names = as_list(patterns)
    if not names:
        raise UserError("selective fine-tuning needs patterns naming the parameters to train, e.g. "
                        "patterns='decoder.blocks.3,lm_head'")
    freeze(model)
    unfreeze(model, names)
    record_method(model, "selective", {"patterns": names})
    return model
