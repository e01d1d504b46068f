"""Other formats lmforge speaks: Hugging Face model folders and `peft` adapters. Sits above the models and
peft; nothing below imports it."""

from lmforge.interop.folders import is_hf_folder, load, load_hf, read_hf_weights, save_hf
from lmforge.interop.hf import (
    SUPPORTED_TYPES,
    architecture_of,
    config_from_hf,
    from_hf_state_dict,
    generation_config,
    hf_config,
    hf_weight_names,
    tie_from_weights,
    to_hf_state_dict,
)
from lmforge.interop.peft import hf_lora_modules, load_adapter, load_peft_adapter, save_peft_adapter

__all__ = [
    "SUPPORTED_TYPES", "architecture_of", "config_from_hf", "from_hf_state_dict", "generation_config", "hf_config",
    "hf_lora_modules", "hf_weight_names", "is_hf_folder", "load", "load_adapter", "load_hf", "load_peft_adapter",
    "read_hf_weights", "save_hf", "save_peft_adapter", "tie_from_weights", "to_hf_state_dict",
]
