"""Arithmetic about models: parameter counts, FLOPs per token, model-FLOPs utilisation, peak speed."""

from __future__ import annotations

import functools
import time

import torch

from lmforge.config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s) of common accelerators, for MFU on CUDA.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: every Linear, including the output head. For an
    encoder-decoder this counts both stacks, i.e. FLOPs per (input, target) token pair."""
    attention = cfg.d_model * (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.d_model
    mlp = cfg.d_model * cfg.hidden_size * (3 if cfg.gated else 2)
    layers = cfg.n_layers * (attention + mlp)
    if cfg.family == "seq2seq":  # decoder blocks: self- and cross-attention (same size), MLP
        layers += cfg.decoder_layers * (2 * attention + mlp)
    return layers + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, training: bool = True) -> float:
    """6N + 12·L·T·d for a training step (forward + backward); a third of that for inference.

    N counts the matmul weights; the attention term is QK^T and AV over a T-token context
    (the PaLM / nanoGPT convention, which does not halve for the causal mask).
    """
    seq_len = seq_len or cfg.context_length
    forward = 2 * matmul_parameters(cfg) + 4 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return forward * (3 if training else 1)


@functools.lru_cache(maxsize=8)
def measured_matmul_peak(device: str = "cpu", size: int = 2048, trials: int = 5, seconds: float = 0.2) -> float:
    """FLOP/s of a large fp32 `torch.mm` on this device: the best of several short trials, since a
    shared CPU can be busy during any one of them. This is the roof MFU is measured against on CPUs."""
    g = torch.Generator(device=device).manual_seed(0)  # its own: the global RNG belongs to the training run
    a = torch.randn(size, size, device=device, generator=g)
    b = torch.randn(size, size, device=device, generator=g)
    torch.mm(a, b)  # warm up
    best = 0.0
    for _ in range(trials):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            count += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * count / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device) -> float:
    """Best available peak for MFU: a table for known GPUs, a measured matmul otherwise."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
    return measured_matmul_peak(str(device))


def training_memory_bytes(n_params: int, bytes_per_param: int = 24) -> int:
    """Rule of thumb for mixed-precision AdamW training without activations: ~24 bytes per parameter.

    (4 fp32 weights + 4 fp32 gradients + 8 Adam moments + 4 master/bf16 copies and workspace.)
    """
    return n_params * bytes_per_param


CHINCHILLA_TOKENS_PER_PARAMETER = 20  # Hoffmann et al. 2022: compute-optimal data ≈ 20 tokens per parameter


def compute_optimal_tokens(n_params: int) -> int:
    """Training tokens that make a model of n_params compute-optimal (the Chinchilla rule of thumb)."""
    return CHINCHILLA_TOKENS_PER_PARAMETER * n_params


def training_flops(n_params: int, tokens: int) -> float:
    """Total training compute C ≈ 6·N·D (forward 2ND + backward 4ND)."""
    return 6.0 * n_params * tokens
