"""Post-training weight quantization: every format is a `QuantizedLinear` subclass, listed in `FORMATS`.

- "int8": per-output-channel symmetric absmax int8 codes, fp32 scales; forward de-quantizes to one F.linear.
- "int8-dynamic": the same weights, and the activations quantized to int8 on the fly (per tensor) for fbgemm's
  int8 GEMM (`torch.ops.quantized.linear_dynamic`, what `quantize_dynamic` runs): the fastest correct kernel
  measured on this CPU (benchmarks/quant_kernels.py). Where it cannot run (CUDA, bf16 inputs, or a forward that
  needs the input's gradient, e.g. LoRA training on this base) it falls back to de-quantize + F.linear.
- "int4": group-wise asymmetric round-to-nearest with `bits` 2..8 (4 by default) and `group_size` columns per
  group; codes are bit-packed densely (eight 3-bit codes in three bytes), one fp32 scale and one integer zero
  point per group. GPTQ (`lmforge.compress.gptq`) writes its codes into this class.
- "nf4": 4-bit NormalFloat (Dettmers et al. 2023, QLoRA) in blocks of 64, block scales double-quantized to FP8.

Every quantized tensor is a persistent buffer, so a model's state dict (and a safetensors file) carries it;
`restore_quantized_layers` rebuilds the empty modules a saved state dict loads into. `QuantizedEmbedding` is the
embedding table's int8 per-row form (rows gathered, then de-quantized: never the whole table per forward).
"""

from __future__ import annotations

import functools
import math
import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import UserError
from lmforge.nn import Block

# -- shared integer helpers (RTN and GPTQ use the same ones) -------------------------------------------------


def asymmetric_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a 2-D block: (scale, integer zero point) that map [min(row, 0), max(row, 0)] onto 0..2^bits-1.
    Zero is in the range so that an exact 0 stays exact; a constant-zero row gets scale 1."""
    maxq = 2 ** bits - 1
    low, high = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    scale = (high - low) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale).clamp(0, maxq)
    return scale, zero


def quantize_asymmetric(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes 0..2^bits-1 (uint8) of a (rows, n) block with per-row scale and zero point."""
    return torch.round(w / scale[:, None] + zero[:, None]).clamp(0, 2 ** bits - 1).to(torch.uint8)


def dequantize_asymmetric(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The inverse of `quantize_asymmetric`: (codes - zero) · scale, per row, in fp32."""
    return (codes.float() - zero.float()[:, None]) * scale.float()[:, None]


def packed_size(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits take: ceil(numel · bits / 8)."""
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes < 2^bits → a dense uint8 stream, little-endian bit order (code i at bit i·bits). Eight codes fill
    `bits` bytes exactly; a trailing partial group takes only the bytes its bits need."""
    _check_bits(bits)
    flat = codes.flatten().to(torch.uint8)
    if bits == 8:
        return flat.clone()
    numel = flat.numel()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, no 64-bit detour
        per_byte = 8 // bits
        lanes = F.pad(flat, (0, -numel % per_byte)).view(-1, per_byte).to(torch.int32)
        shifts = torch.arange(0, 8, bits, device=flat.device, dtype=torch.int32)
        return (lanes << shifts).sum(dim=1).to(torch.uint8)
    word = _word_dtype(bits)
    groups = F.pad(flat, (0, -numel % 8)).view(-1, 8).to(word)  # 8 codes = `bits` bytes (<= 56 bits)
    words = (groups << torch.arange(0, 8 * bits, bits, device=flat.device, dtype=word)).sum(dim=1, dtype=word)
    stream = (words[:, None] >> torch.arange(0, 8 * bits, 8, device=flat.device, dtype=word)) & 0xFF
    return stream.flatten()[:packed_size(numel, bits)].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The inverse of `pack_codes`: the first `numel` codes as uint8."""
    _check_bits(bits)
    if bits == 8:
        return packed[:numel]
    mask = 2 ** bits - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        return ((packed[:, None] >> shifts) & mask).flatten()[:numel]
    word = _word_dtype(bits)
    stream = F.pad(packed, (0, -packed.numel() % bits)).view(-1, bits).to(word)
    words = (stream << torch.arange(0, 8 * bits, 8, device=packed.device, dtype=word)).sum(dim=1, dtype=word)
    codes = (words[:, None] >> torch.arange(0, 8 * bits, bits, device=packed.device, dtype=word)) & mask
    return codes.flatten()[:numel].to(torch.uint8)


def _word_dtype(bits: int) -> torch.dtype:
    """Integer type that holds 8 codes of `bits` bits: int32 up to 3 bits (24 bits; faster), else int64."""
    return torch.int32 if 8 * bits < 32 else torch.int64


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise UserError(f"bits={bits} is not a code width lmforge packs; use an integer from 2 to 8")


def absmax_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (codes in -127..127, fp32 scale = absmax/127); an all-zero row gets scale 1."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


# -- NF4 (moved from peft/quant.py; QLoRA's base format) ------------------------------------------------------

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


def _check_nf4_block(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise UserError(f"block_size={block_size} must be an even number >= 2 (two 4-bit codes share a byte)")


def nf4_quantize(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """weight → {"codes": packed uint8 (two 4-bit codes a byte), block scales}; see `nf4_dequantize`."""
    _check_nf4_block(block_size)
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


# -- the modules ---------------------------------------------------------------------------------------------

Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]


class QuantizedLinear(nn.Module, ABC):
    """A frozen nn.Linear kept in a quantized form; the base of every format in `FORMATS`.

    A subclass sets `format` and `DEFAULTS` (its constructor options) and implements `quantize` (weight →
    buffers), `buffer_specs` (their shapes and dtypes, for `empty`) and `dequantize`. The bias stays in full
    precision, frozen like the weight."""

    format: ClassVar[str]
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, in_features: int, out_features: int, buffers: dict[str, torch.Tensor],
                 bias: torch.Tensor | None, **options: Any) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quantized_parameters = in_features * out_features  # counted by `peft.describe` as base parameters
        self._options = self.check_options(in_features, **options)
        self.buffer_names = tuple(buffers)
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    # construction

    @classmethod
    def check_options(cls, in_features: int, **options: Any) -> dict[str, Any]:
        """The full options (defaults filled in), or a UserError naming an unknown or bad one."""
        unknown = sorted(set(options) - set(cls.DEFAULTS))
        if unknown:
            accepted = ", ".join(cls.DEFAULTS) or "none"
            raise UserError(f"quantization format '{cls.format}' has no option(s) {unknown}; its options: {accepted}")
        return {**cls.DEFAULTS, **options}

    @classmethod
    @abstractmethod
    def quantize(cls, weight: torch.Tensor, **options: Any) -> dict[str, torch.Tensor]:
        """An fp32 (out, in) weight → the format's buffers."""

    @classmethod
    @abstractmethod
    def buffer_specs(cls, in_features: int, out_features: int, **options: Any) -> Specs:
        """Name → (shape, dtype) of each buffer `quantize` returns for this layer size and these options."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Any) -> QuantizedLinear:
        """Quantize `linear`'s weight (computed in fp32 on its device); the bias is copied."""
        full = cls.check_options(linear.in_features, **options)
        buffers = cls.quantize(linear.weight.detach().float(), **full)
        return cls(linear.in_features, linear.out_features, buffers, linear.bias, **full)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, **options: Any) -> QuantizedLinear:
        """A module with zero buffers of exactly the shapes and dtypes `from_linear` gives (works under
        torch.device("meta")), for `load_state_dict(..., assign=True)` to fill."""
        full = cls.check_options(in_features, **options)
        buffers = {name: torch.zeros(shape, dtype=dtype)
                   for name, (shape, dtype) in cls.buffer_specs(in_features, out_features, **full).items()}
        return cls(in_features, out_features, buffers, torch.zeros(out_features) if bias else None, **full)

    # use

    def options(self) -> dict[str, Any]:
        """The constructor options, JSON-able (what a layer map records)."""
        return dict(self._options)

    def quant_buffers(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.buffer_names}

    @property
    def device(self) -> torch.device:
        return next(iter(self.quant_buffers().values())).device

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight these buffers stand for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_linear(self) -> nn.Linear:
        """The de-quantized weight as a plain nn.Linear (what merging and `dequantize_model` need)."""
        weight = self.dequantize()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def storage_bytes(self) -> int:
        """Bytes of the quantized buffers (the bias is not counted: it is not a quantized weight)."""
        return sum(t.numel() * t.element_size() for t in self.quant_buffers().values())

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self._options.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.format}" + (
            f" {options}" if options else "")


class Int8Linear(QuantizedLinear):
    """Weight-only int8, one symmetric absmax scale per output channel; the error per element is at most
    half its row's scale. Forward: x @ codes.T (in x's dtype) times the row scales, plus the bias."""

    format = "int8"

    @classmethod
    def quantize(cls, weight: torch.Tensor, **options: Any) -> dict[str, torch.Tensor]:
        codes, scale = absmax_int8(weight)
        return {"weight_codes": codes, "weight_scale": scale}

    @classmethod
    def buffer_specs(cls, in_features: int, out_features: int, **options: Any) -> Specs:
        return {"weight_codes": ((out_features, in_features), torch.int8), "weight_scale": ((out_features,),
                                                                                            torch.float32)}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight_codes.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling the (tokens, out) output instead of the (out, in) weight: one pass over the weight fewer.
        y = F.linear(x, self.weight_codes.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int8DynamicLinear(Int8Linear):
    """int8 weights (as "int8") and int8 activations quantized per call, through fbgemm's int8 GEMM.

    The packed weight fbgemm wants is built on the first forward and dropped whenever the buffers may have
    changed (a state-dict load, a device move); it is never part of the state dict."""

    format = "int8-dynamic"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._packed: Any = None

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and FBGEMM
                and not (torch.is_grad_enabled() and x.requires_grad))  # fbgemm's op has no input gradient

    def packed(self) -> Any:
        if self._packed is None:
            bias = None if self.bias is None else self.bias.detach().float()
            self._packed = pack_int8(self.weight_codes, self.weight_scale, bias)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._kernel_applies(x):
            return super().forward(x)
        return torch.ops.quantized.linear_dynamic(x, self.packed(), not full_range_activations())

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        self._packed = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_packed": None}  # deepcopy/pickle rebuild it lazily


FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


def pack_int8(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """fbgemm's packed form of per-channel int8 weights (codes · scale per row) and an fp32 bias."""
    scale = scale.double()
    with warnings.catch_warnings():  # torch 2.13 marks quantized tensors deprecated; the ops are current
        warnings.simplefilter("ignore", UserWarning)
        weight = torch._make_per_channel_quantized_tensor(codes, scale, torch.zeros_like(scale, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(weight, bias)


@functools.cache
def full_range_activations() -> bool:
    """Whether the int8 GEMM takes 8-bit activations without saturating, measured once on this CPU.

    Without VNNI, fbgemm sums pairs of u8·s8 products in int16, and 2 · 255 · 127 overflows it; that is why torch's
    dynamic Linear always quantizes activations to 7 bits (reduce_range). With VNNI (vpdpbusd) products add up in
    int32, and the 8th bit halves the activation rounding error (on a trained 6-layer model: +1.1% perplexity with
    7 bits, +0.2% with 8). The probe: all-255 activations against all-127 weights, which saturates int16 pairs."""
    width = 64
    packed = pack_int8(torch.full((1, width), 127, dtype=torch.int8), torch.full((1,), 1 / 127), None)
    out = torch.ops.quantized.linear_dynamic(torch.ones(1, width), packed, False)
    return abs(out.item() - width) < 0.5


class Int4Linear(QuantizedLinear):
    """Group-wise asymmetric integer codes (`bits` 2..8, 4 by default): each row is cut into groups of
    `group_size` columns, each group has an fp32 scale and an integer zero point (uint8), and codes are
    bit-packed densely. Round-to-nearest keeps each element within half its group's scale."""

    format = "int4"
    DEFAULTS: ClassVar[dict[str, Any]] = {"bits": 4, "group_size": 128}

    @classmethod
    def check_options(cls, in_features: int, **options: Any) -> dict[str, Any]:
        full = super().check_options(in_features, **options)
        bits, group = full["bits"], full["group_size"]
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise UserError(f"bits={bits} is not supported for int4 (group-wise) quantization; use 2 to 8 (4 or 3 "
                            "for GPTQ)")
        if not isinstance(group, int) or group < 1 or in_features % group:
            divisors = [d for d in (32, 64, 128, 256) if in_features % d == 0] or [in_features]
            raise UserError(f"group_size={group} does not divide the layer width {in_features}; choose a divisor of "
                            f"{in_features} such as {divisors[-1]} (or {in_features}: one group per row)")
        return full

    @classmethod
    def quantize(cls, weight: torch.Tensor, bits: int = 4, group_size: int = 128) -> dict[str, torch.Tensor]:
        out, width = weight.shape
        groups = weight.reshape(-1, group_size)  # (out · n_groups, group_size), one group per row
        scale, zero = asymmetric_params(groups, bits)
        codes = quantize_asymmetric(groups, scale, zero, bits)
        return cls.buffers(codes.view(out, width), scale.view(out, -1), zero.view(out, -1), bits)

    @staticmethod
    def buffers(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
        """The stored form of (out, in) codes and (out, n_groups) scales/zero points (also GPTQ's)."""
        return {"codes": pack_codes(codes, bits), "scales": scale.float().contiguous(),
                "zeros": zero.to(torch.uint8).contiguous()}

    @classmethod
    def buffer_specs(cls, in_features: int, out_features: int, bits: int = 4, group_size: int = 128) -> Specs:
        groups = (out_features, in_features // group_size)
        return {"codes": ((packed_size(in_features * out_features, bits),), torch.uint8),
                "scales": (groups, torch.float32), "zeros": (groups, torch.uint8)}

    def unpacked_codes(self) -> torch.Tensor:
        """The (out, in) integer codes."""
        numel = self.in_features * self.out_features
        return unpack_codes(self.codes, self._options["bits"], numel).view(self.out_features, self.in_features)

    def float_codes(self) -> torch.Tensor:
        """The (out, in) codes as fp32. For 2 and 4 bits one table lookup per byte yields all its codes at once
        (~3x faster than shifting and masking, and this runs on every forward)."""
        bits, numel = self._options["bits"], self.in_features * self.out_features
        if 8 % bits or bits == 8:
            codes = unpack_codes(self.codes, bits, numel).float()
        else:
            codes = _byte_table(bits, self.codes.device).index_select(0, self.codes.int()).view(-1)[:numel]
        return codes.view(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n_groups = self.scales.shape[1]
        codes = self.float_codes().view(self.out_features, n_groups, -1)
        scale = self.scales.float()[..., None]
        # (code - zero) · scale as one fused pass: code · scale + (-zero · scale)
        weight = torch.addcmul(-self.zeros.float()[..., None] * scale, codes, scale)
        return weight.view(self.out_features, self.in_features).to(dtype)


_BYTE_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _byte_table(bits: int, device: torch.device) -> torch.Tensor:
    """(256, 8 // bits) fp32: the codes packed in each byte value, in `pack_codes`' order."""
    key = (bits, device)
    if key not in _BYTE_TABLES:
        values = torch.arange(256)
        shifts = torch.arange(0, 8, bits)
        _BYTE_TABLES[key] = ((values[:, None] >> shifts) & (2 ** bits - 1)).float().to(device)
    return _BYTE_TABLES[key]


class NF4Linear(QuantizedLinear):
    """NF4 in blocks of `block_size` (64) over the flattened weight; `double_quant` stores the block scales
    as FP8 too. The error per element is at most half the widest gap between NF4 levels times its block's
    absmax (plus the scale's own FP8 error under double quantization)."""

    format = "nf4"
    DEFAULTS: ClassVar[dict[str, Any]] = {"block_size": 64, "double_quant": True}

    @classmethod
    def check_options(cls, in_features: int, **options: Any) -> dict[str, Any]:
        full = super().check_options(in_features, **options)
        _check_nf4_block(full["block_size"])
        full["double_quant"] = bool(full["double_quant"])
        return full

    @classmethod
    def quantize(cls, weight: torch.Tensor, block_size: int = 64, double_quant: bool = True
                 ) -> dict[str, torch.Tensor]:
        return nf4_quantize(weight, block_size, double_quant)

    @classmethod
    def buffer_specs(cls, in_features: int, out_features: int, block_size: int = 64, double_quant: bool = True
                     ) -> Specs:
        blocks = math.ceil(in_features * out_features / block_size)
        specs: Specs = {"codes": ((blocks * block_size // 2,), torch.uint8)}
        if not double_quant:
            return specs | {"absmax": ((blocks,), torch.float32)}
        return specs | {"absmax_codes": ((blocks,), torch.uint8),
                        "absmax_scale": ((math.ceil(blocks / SCALE_BLOCK),), torch.float32),
                        "absmax_offset": ((1,), torch.float32)}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return nf4_dequantize(self.quant_buffers(), (self.out_features, self.in_features),
                              self._options["block_size"], dtype)


FORMATS: dict[str, type[QuantizedLinear]] = {
    cls.format: cls for cls in (Int8Linear, Int8DynamicLinear, Int4Linear, NF4Linear)}


class QuantizedEmbedding(nn.Module):
    """An embedding table as int8 codes with one absmax scale per row; a lookup gathers the rows' codes and
    scales, then de-quantizes only those rows. `weight` (the whole table, de-quantized) exists for code that
    reads `embed.weight` for its device or values."""

    format: ClassVar[str] = "int8-embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, codes: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.quantized_parameters = num_embeddings * embedding_dim
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", scale)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, **options: Any) -> QuantizedEmbedding:
        cls.check_options(**options)
        codes, scale = absmax_int8(embedding.weight)
        return cls(embedding.num_embeddings, embedding.embedding_dim, codes, scale)

    @classmethod
    def empty(cls, num_embeddings: int, embedding_dim: int, **options: Any) -> QuantizedEmbedding:
        cls.check_options(**options)
        return cls(num_embeddings, embedding_dim, torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8),
                   torch.zeros(num_embeddings))

    @classmethod
    def check_options(cls, **options: Any) -> None:
        if options:
            raise UserError(f"int8 embeddings take no options, got {sorted(options)}")

    def options(self) -> dict[str, Any]:
        return {}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_codes).float() * self.weight_scale[ids][..., None]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight_codes.float() * self.weight_scale[:, None]).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def to_embedding(self) -> nn.Embedding:
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, device=self.weight_codes.device)
        with torch.no_grad():
            embedding.weight.copy_(self.dequantize())
        return embedding

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight_codes, self.weight_scale))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"


QUANTIZED = (QuantizedLinear, QuantizedEmbedding)

# -- whole models ---------------------------------------------------------------------------------------------


def block_linears(model: nn.Module) -> list[str]:
    """Names of the transformer blocks' linear layers (attention, cross-attention and MLP projections)."""
    blocks = [name for name, m in model.named_modules() if isinstance(m, Block)]
    return [f"{b}.{name}" for b in blocks for name, m in model.get_submodule(b).named_modules()
            if isinstance(m, nn.Linear)]


def head_linears(model: nn.Module) -> list[str]:
    """The linears outside the blocks: the LM head and a task head's layers (pooler, classifier, MLM dense)."""
    inside = set(block_linears(model))
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in inside]


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED) for m in model.modules())


def has_tied_head(model: nn.Module) -> bool:
    head, embed = getattr(model, "lm_head", None), getattr(model, "embed", None)
    return head is not None and isinstance(embed, nn.Embedding) and head.weight is embed.weight


def untie_head(model: nn.Module) -> None:
    """Give a tied LM head its own copy of the embedding, and record it in the config so that loading does
    not tie them again: quantizing one of the two must never change the other."""
    model.lm_head.weight = nn.Parameter(model.embed.weight.detach().clone(),
                                        requires_grad=model.embed.weight.requires_grad)
    if hasattr(model, "cfg"):
        model.cfg.tie_embeddings = False


def targets(model: nn.Module, include_head: bool = False) -> list[str]:
    """The linears `quantize_model` replaces: the blocks' and, with include_head, the head's."""
    names = block_linears(model) + (head_linears(model) if include_head else [])
    if not names:
        raise UserError("this model has no transformer-block linear layers to quantize")
    return names


def require_unquantized(model: nn.Module) -> None:
    found = sorted({m.format for m in model.modules() if isinstance(m, QUANTIZED)})
    if found:
        raise UserError(f"the model is already quantized ({', '.join(found)}); quantize the original full-precision "
                        "checkpoint instead")


def quantize_model(model: nn.Module, method: str, *, include_embeddings: bool = False, include_head: bool = False,
                   **options: Any) -> dict[str, dict[str, Any]]:
    """Replace the transformer blocks' linears (and, if asked, the head and the token embedding) by quantized
    modules of format `method`, in place. Returns the layer map {module name: {"format": ..., **options}} that
    `restore_quantized_layers` takes. A tied head is untied first when only one side is to be quantized or when
    it is (it gets its own quantized copy), and its map entry says "untied": true."""
    if method not in FORMATS:
        raise UserError(f"quantization method '{method}' is unknown; choose one of: {', '.join(FORMATS)}")
    require_unquantized(model)
    names = targets(model, include_head)
    for name in names:  # validate every layer's options before changing any
        FORMATS[method].check_options(model.get_submodule(name).in_features, **options)
    untied = (include_head or include_embeddings) and has_tied_head(model)
    if untied:
        untie_head(model)
    layer_map = quantize_layers(model, names, method, **options)
    if include_embeddings:
        model.embed = QuantizedEmbedding.from_embedding(model.embed)
        layer_map["embed"] = {"format": QuantizedEmbedding.format}
    if untied:
        layer_map.setdefault("lm_head", {"format": None})["untied"] = True
    return layer_map


def quantize_layers(model: nn.Module, names: list[str], method: str, **options: Any) -> dict[str, dict[str, Any]]:
    """Replace the named nn.Linear modules by `method`'s quantized form (QLoRA quantizes a base's remaining
    float block linears with this); returns their layer-map entries."""
    cls = FORMATS[method]
    for name in names:  # validate every layer's options before changing any
        cls.check_options(model.get_submodule(name).in_features, **options)
    layer_map: dict[str, dict[str, Any]] = {}
    for name in names:
        module = cls.from_linear(model.get_submodule(name), **options)
        model.set_submodule(name, module)
        layer_map[name] = {"format": cls.format, **module.options()}
    return layer_map


def restore_quantized_layers(model: nn.Module, layer_map: dict[str, dict[str, Any]]) -> nn.Module:
    """The inverse `quantize_model` needs at load time: every named module becomes an empty quantized module
    of its format, so that a state dict saved from the quantized model loads with assign=True (a model built
    with `Model.for_loading` works: the empty modules take the current default device)."""
    if any(entry.get("untied") for entry in layer_map.values()) and has_tied_head(model):
        untie_head(model)
    for name, entry in layer_map.items():
        options = {k: v for k, v in entry.items() if k not in ("format", "untied")}
        fmt = entry.get("format")
        if fmt is None:
            continue
        module = _submodule(model, name)
        device = _device_of(module)
        with torch.device(device):
            if fmt == QuantizedEmbedding.format:
                new: nn.Module = QuantizedEmbedding.empty(module.num_embeddings, module.embedding_dim, **options)
            elif fmt in FORMATS:
                new = FORMATS[fmt].empty(module.in_features, module.out_features, module.bias is not None, **options)
            else:
                raise UserError(f"layer '{name}' has quantization format '{fmt}', which this lmforge does not know; "
                                f"known: {', '.join([*FORMATS, QuantizedEmbedding.format])}")
        model.set_submodule(name, new)
    return model


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UserError(f"the quantization map names layer '{name}', which this model does not have; the "
                        "checkpoint's config and quantization map do not belong together") from None


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def quantized_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, QUANTIZED)]


def bytes_per_parameter(model: nn.Module) -> float:
    """Storage of the quantized weights per weight they stand for: ~0.516 for NF4 with double quantization,
    1 + 4/width for int8 (codes + per-row fp32 scales), 0.5 + 5/128 ≈ 0.539 for 4-bit groups of 128."""
    layers = quantized_modules(model)
    if not layers:
        raise UserError("the model has no quantized layers; apply method 'qlora' (or quantize_model) first")
    return sum(m.storage_bytes() for m in layers) / sum(m.quantized_parameters for m in layers)


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized module by the plain nn.Linear / nn.Embedding it de-quantizes to, in place."""
    for name in [n for n, m in model.named_modules() if isinstance(m, QUANTIZED)]:
        module = model.get_submodule(name)
        model.set_submodule(name, module.to_linear() if isinstance(module, QuantizedLinear) else module.to_embedding())
    return model
