"""Compression: make a trained model smaller and faster, and measure what it costs.

- `quant`: post-training quantization (int8 weight-only, int8 with dynamic int8 activations, group-wise int4,
  NF4 with double quantization) as drop-in quantized Linear modules; `gptq`: GPTQ's second-order rounding.
- `distill`: knowledge distillation losses for the one training loop.
- `prune`: magnitude, Wanda and N:M sparsity, and structured removal of heads and MLP neurons.
- `storage`: compressed checkpoints are ordinary folders plus compression.json; `lmforge.load` reads them.

Import from the submodules (`from lmforge.compress.quant import quantize_model`): this package stays light.
"""
