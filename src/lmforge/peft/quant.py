"""4-bit NormalFloat (NF4) weights for QLoRA (Dettmers et al. 2023).

A weight is cut into blocks of 64 values; each block is divided by its absolute maximum and every
value is rounded to the nearest of 16 NF4 levels (quantiles of a standard normal, so equally many
weights fall in each bin). Two 4-bit codes share a byte. Double quantization stores the fp32 block
scales themselves in 8 bits: minus their mean, in blocks of 256, as FP8 (e4m3) times one fp32 scale
per block, as the paper does. `QuantizedLinear` keeps only this packed form and de-quantizes it for
each matmul, so the base costs ~0.5 bytes per parameter instead of 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import UserError
from lmforge.nn import Block

# The 16 NF4 levels as published with the paper (bitsandbytes' table): exact 0, and ±1 at the ends.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
# Byte b → (level of its high code, level of its low code), the order nf4_quantize packs them in.
NF4_PAIRS = torch.stack([NF4_LEVELS[torch.arange(256) >> 4], NF4_LEVELS[torch.arange(256) & 15]], dim=1)
FP8_MAX = 448.0  # largest finite float8 e4m3fn
SCALE_BLOCK = 256


def nf4_quantize(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """weight → {"codes": packed uint8 (two 4-bit codes a byte), block scales}; see `nf4_dequantize`."""
    if block_size < 2 or block_size % 2:
        raise UserError(f"block_size={block_size} must be an even number >= 2 (two 4-bit codes share a byte)")
    flat = weight.detach().float().flatten()
    flat = F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)
    absmax = flat.abs().amax(dim=1)
    normalised = flat / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    levels = NF4_LEVELS.to(flat.device)
    codes = torch.bucketize(normalised, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).flatten()
    packed = (codes[0::2] << 4) | codes[1::2]
    return {"codes": packed, **(double_quantize(absmax) if double_quant else {"absmax": absmax})}


def nf4_dequantize(buffers: dict[str, torch.Tensor], shape: torch.Size | tuple[int, ...], block_size: int = 64,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of `nf4_quantize`, up to rounding: a `shape` tensor of `dtype`."""
    packed = buffers["codes"]
    absmax = buffers["absmax"] if "absmax" in buffers else double_dequantize(buffers)
    # One lookup per byte (both of its levels at once), not per 4-bit code: QLoRA does this every forward.
    pairs = NF4_PAIRS.to(packed.device).index_select(0, packed.int())
    values = pairs.view(-1, block_size).mul_(absmax.float()[:, None])
    numel = torch.Size(shape).numel()
    return values.view(-1)[:numel].view(shape).to(dtype)


def double_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp32 block scales → FP8 codes (as uint8 bytes, so `.to(dtype)` never touches them), one fp32
    scale per 256 of them and one shared offset."""
    offset = absmax.mean()
    centred = F.pad(absmax - offset, (0, -absmax.numel() % SCALE_BLOCK)).view(-1, SCALE_BLOCK)
    scale = centred.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / FP8_MAX
    codes = (centred / scale[:, None]).to(torch.float8_e4m3fn).view(torch.uint8).flatten()[:absmax.numel()]
    return {"absmax_codes": codes, "absmax_scale": scale, "absmax_offset": offset.reshape(1)}


def double_dequantize(buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    codes = buffers["absmax_codes"]
    fp8 = F.pad(codes, (0, -codes.numel() % SCALE_BLOCK)).view(torch.float8_e4m3fn).float().view(-1, SCALE_BLOCK)
    return (fp8 * buffers["absmax_scale"].float()[:, None]).flatten()[:codes.numel()] + buffers["absmax_offset"]


class QuantizedLinear(nn.Module):
    """A frozen nn.Linear stored as NF4; forward de-quantizes the weight for one ordinary matmul.
    The bias (if any) stays in full precision, frozen like the weight."""

    BUFFERS = ("codes", "absmax", "absmax_codes", "absmax_scale", "absmax_offset")

    def __init__(self, linear: nn.Linear, block_size: int = 64, double_quant: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size = block_size
        self.quantized_parameters = linear.weight.numel()  # counted by `describe` as base parameters
        for name, tensor in nf4_quantize(linear.weight, block_size, double_quant).items():
            self.register_buffer(name, tensor)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def quant_buffers(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.BUFFERS if hasattr(self, name)}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return nf4_dequantize(self.quant_buffers(), (self.out_features, self.in_features), self.block_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_linear(self) -> nn.Linear:
        """The de-quantized weight as a plain nn.Linear (what merging needs)."""
        weight = self.dequantize()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.quant_buffers().values())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={self.block_size}"


def quantizable(model: nn.Module) -> list[str]:
    """Names of the transformer blocks' linear layers (attention and MLP projections). Embeddings, the
    LM head and task heads stay in full precision, as in QLoRA."""
    blocks = [name for name, m in model.named_modules() if isinstance(m, Block)]
    return [f"{b}.{name}" for b in blocks for name, m in model.get_submodule(b).named_modules()
            if isinstance(m, nn.Linear)]


def quantize_model(model: nn.Module, block_size: int = 64, double_quant: bool = True) -> nn.Module:
    """Replace every block linear by a `QuantizedLinear`, in place."""
    names = quantizable(model)
    if not names:
        raise UserError("this model has no transformer-block linear layers to quantize")
    for name in names:
        model.set_submodule(name, QuantizedLinear(model.get_submodule(name), block_size, double_quant))
    return model


def bytes_per_parameter(model: nn.Module) -> float:
    """Storage of the quantized base weights per weight: 0.5 for the 4-bit codes plus the block scales
    (~0.5625 with fp32 scales, ~0.516 with double quantization)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        raise UserError("the model has no quantized layers; apply method 'qlora' (or quantize_model) first")
    return sum(m.storage_bytes() for m in layers) / sum(m.quantized_parameters for m in layers)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every `QuantizedLinear` by the plain nn.Linear it de-quantizes to, in place."""
    for name in [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]:
        model.set_submodule(name, model.get_submodule(name).to_linear())
    return model
