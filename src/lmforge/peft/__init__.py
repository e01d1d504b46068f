"""Parameter-efficient fine-tuning. Each method is (which parameters train) + (how the forward changes):

- lora / qlora: low-rank updates on chosen projections (qlora: over a frozen 4-bit NF4 base, or any
  already-quantized base; the formats live in `lmforge.compress.quant`)
- prompt: trainable virtual-token embeddings in front of the input
- prefix: trainable keys/values in front of every self-attention layer's
- adapter: bottleneck MLPs after each block's attention and MLP
- bitfit / selective: only the biases / only named parameters train; full: everything trains

`apply_method(model, method, **options)` is the one entry point; `save_method_state` /
`load_method_state` store only what trained; `merge` folds LoRA into plain weights. The `peft` library's
adapter format lives in `lmforge.interop.peft`. Sits above models and train; nothing here imports interop.
"""

from lmforge.compress.quant import (
    NF4_LEVELS,
    QuantizedLinear,
    bytes_per_parameter,
    dequantize_model,
    nf4_dequantize,
    nf4_quantize,
    quantize_model,
)
from lmforge.peft.adapters import BottleneckAdapter, apply_adapters, apply_bitfit, apply_selective
from lmforge.peft.core import (
    ParameterCount,
    PeakMemory,
    adapters_disabled,
    describe,
    freeze,
    measure_peak_memory,
    unfreeze,
)
from lmforge.peft.lora import (
    LoraConfig,
    LoraUpdate,
    add_lora,
    apply_lora,
    lora_sites,
    lora_state,
    merge_lora,
    unmerge_lora,
)
from lmforge.peft.methods import (
    METHODS,
    apply_full,
    apply_method,
    apply_qlora,
    load_method_state,
    merge,
    method_options,
    method_restorer,
    method_saver,
    save_method_state,
    with_method,
)
from lmforge.peft.prefix import PrefixTuning, apply_prefix_tuning, bake_prefixes
from lmforge.peft.prompt import SoftPrompt, apply_prompt_tuning

__all__ = [
    "METHODS", "NF4_LEVELS", "BottleneckAdapter", "LoraConfig", "LoraUpdate", "ParameterCount", "PeakMemory",
    "PrefixTuning", "QuantizedLinear", "SoftPrompt", "adapters_disabled", "add_lora", "apply_adapters", "apply_bitfit",
    "apply_full",
    "apply_lora", "apply_method", "apply_prefix_tuning", "apply_prompt_tuning", "apply_qlora", "apply_selective",
    "bake_prefixes", "bytes_per_parameter", "dequantize_model", "describe", "freeze", "load_method_state",
    "lora_sites", "lora_state", "measure_peak_memory", "merge", "merge_lora", "method_options", "method_restorer",
    "method_saver", "nf4_dequantize", "nf4_quantize", "quantize_model", "save_method_state", "unfreeze",
    "unmerge_lora", "with_method",
]
