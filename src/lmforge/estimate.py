"""Arithmetic about models: parameters, bytes, FLOPs, compute-optimal size, model-FLOPs utilisation.

Everything here is a pure function of a `ModelConfig` (and a few numbers), so `lmforge estimate` can answer
for a 70B model on a laptop. The conventions, stated once:

- Parameters are counted exactly as lmforge builds the model (a tied head once); `parameter_breakdown`
  names where they sit, and a test builds every preset on the meta device and compares.
- Training memory follows Rajbhandari et al. 2020 (ZeRO): fp32 training holds weights 4 + gradients 4 +
  AdamW's two fp32 moments 8 = 16 bytes per trained parameter; mixed precision (bf16/fp16) holds 16-bit
  weights 2 + 16-bit gradients 2 + an fp32 master copy 4 + moments 8 = 16 bytes too. (lmforge's own loop is
  PyTorch autocast: fp32 weights 4 + fp32 gradients 4 + moments 8, the same 16.) LoRA/QLoRA keep those 16
  bytes for the adapter alone; the frozen base costs only its storage (QLoRA: NF4, 0.5 byte + block scales).
- Activations per token per layer are the tensors autograd saves in lmforge's block, counted element by
  element (see `block_activation_elements`, checked against autograd's saved tensors in a test) in the spirit
  of Korthikanti et al. 2022, whose 34·h + 5·a·T bytes (16-bit, with dropout, unfused softmax) this replaces:
  lmforge has no dropout masks at p=0 and its fused attention keeps no T×T matrix.
- FLOPs: 6N per token plus the attention term 12·L·T·(heads·head_dim) (PaLM / nanoGPT; no halving for the
  causal mask); Chinchilla: C = 6ND with the ~20 tokens/parameter rule and Hoffmann et al.'s fitted law.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError

# Dense bf16 tensor-core peaks (FLOP/s) of common accelerators, for MFU on CUDA.
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}

# Peak dense 16-bit tensor FLOP/s per GPU for `--gpu` (the data sheets, SXM parts, no 2:4 sparsity):
# V100 125 TFLOP/s fp16; A100 312 TFLOP/s bf16/fp16 (624 with structured sparsity); H100 989 TFLOP/s bf16/fp16.
GPUS = {"v100": 125e12, "a100": 312e12, "h100": 989e12}
A100_SPARSE_PEAK = 624e12
PETAFLOP_S_DAY = 1e15 * 86400  # 8.64e19 FLOPs: one petaFLOP per second for a day

# Bytes per stored value. int8 keeps an fp32 scale per output row; int4 one fp32 scale and a one-byte zero
# point per 128-weight group (lmforge's formats); nf4 is QLoRA's 4-bit NormalFloat, see `NF4_BYTES`.
PRECISIONS = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
INT4_GROUP = 128
NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256
# NF4 with double quantization: 4 bits, an FP8 scale per 64 weights, an fp32 scale per 256 of those.
NF4_BYTES = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_SCALE_BLOCK)
ADAM_BYTES = 8  # two fp32 moments per trained parameter
METHODS = ("full", "lora", "qlora")
DISTRIBUTED = ("none", "ddp", "zero1", "zero2", "zero3")
LORA_TARGETS = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "cross_q", "cross_k", "cross_v", "cross_kv",
                "cross_o")
LORA_ALL = ("q", "k", "v", "o", "gate", "up", "down", "cross_q", "cross_k", "cross_v", "cross_o")

# Hoffmann et al. 2022 ("Chinchilla"), approach 3: L(N, D) = E + A/N^alpha + B/D^beta, nats per token.
CHINCHILLA_LAW = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
CHINCHILLA_TOKENS_PER_PARAMETER = 20  # Hoffmann et al. 2022: compute-optimal data ≈ 20 tokens per parameter


# -- parameters ------------------------------------------------------------------------------------------


def check_transformer(cfg: ModelConfig) -> None:
    if cfg.arch != "transformer":
        raise UserError(f"the calculators cover transformers; model.arch='{cfg.arch}' is recurrent "
                        "(count its parameters with lmforge.models.build_model(cfg).num_parameters())")


def norm_parameters(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)


def attention_parameters(cfg: ModelConfig, cross: bool = False) -> int:
    """One (self- or cross-) attention: the q, k, v and output projections and their biases."""
    d, q_out, kv_out = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    qkv_bias = cfg.attention_bias if cfg.qkv_bias is None else cfg.qkv_bias
    inputs = (q_out + 2 * kv_out) * (d + qkv_bias)
    return inputs + q_out * d + (d if cfg.attention_bias else 0)


def mlp_parameters(cfg: ModelConfig) -> int:
    width = cfg.hidden_size * (2 if cfg.gated else 1)
    return width * (cfg.d_model + cfg.mlp_bias) + cfg.hidden_size * cfg.d_model + (cfg.d_model if cfg.mlp_bias else 0)


def block_parameters(cfg: ModelConfig, cross: bool = False) -> int:
    """One residual block: norms, self-attention, (cross-attention), MLP."""
    attention = attention_parameters(cfg) + (attention_parameters(cfg, cross=True) + norm_parameters(cfg)
                                            if cross else 0)
    return 2 * norm_parameters(cfg) + attention + mlp_parameters(cfg)


def stack_parameters(cfg: ModelConfig, n_layers: int, cross: bool = False) -> int:
    """A TransformerStack: its own position parameters, optional input norm, blocks, final norm (pre-norm)."""
    positions = {"learned": cfg.context_length * cfg.d_model,
                 "relative": cfg.relative_buckets * cfg.n_heads}.get(cfg.positions, 0)
    norms = norm_parameters(cfg) * (int(cfg.embed_norm) + int(cfg.norm_placement == "pre"))
    return positions + norms + n_layers * block_parameters(cfg, cross)


def head_parameters(cfg: ModelConfig) -> int:
    """The output head beyond the token embedding (a tied LM head adds nothing but BERT's bias)."""
    d, vocab = cfg.d_model, cfg.vocab_size
    untied = 0 if cfg.tie_embeddings else vocab * d
    if cfg.family != "masked":
        return untied
    if cfg.head == "lm":  # BERT: dense + activation + norm, then the vocabulary projection with a bias
        return d * d + d + norm_parameters(cfg) + untied + vocab
    if cfg.head == "sequence":
        return (d * d + d if cfg.pooling == "cls" else 0) + d * cfg.num_labels + cfg.num_labels
    if cfg.head == "token":
        return d * cfg.num_labels + cfg.num_labels
    return 0


def parameter_breakdown(cfg: ModelConfig) -> dict[str, int]:
    """Where the parameters sit: embeddings, each stack (blocks, norms, positions), the head."""
    check_transformer(cfg)
    parts = {"embeddings": cfg.vocab_size * cfg.d_model + cfg.type_vocab_size * cfg.d_model}
    if cfg.family == "seq2seq":
        parts["encoder"] = stack_parameters(cfg, cfg.n_layers)
        parts["decoder"] = stack_parameters(cfg, cfg.decoder_layers, cross=True)
    else:
        parts["encoder" if cfg.family == "masked" else "decoder"] = stack_parameters(cfg, cfg.n_layers)
    parts["head"] = head_parameters(cfg)
    return parts


def count_parameters(cfg: ModelConfig) -> int:
    """Unique parameters of the model lmforge builds from `cfg` (a tied head counted once)."""
    return sum(parameter_breakdown(cfg).values())


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: every Linear, including the output head. For an
    encoder-decoder this counts both stacks, i.e. FLOPs per (input, target) token pair. A recurrent layer
    multiplies its input and its state by gates x d x d matrices each (rnn 1, lstm 4, gru 3 gates)."""
    if cfg.arch != "transformer":
        gates = {"rnn": 1, "lstm": 4, "gru": 3}[cfg.arch]
        return cfg.n_layers * gates * 2 * cfg.d_model**2 + cfg.d_model * cfg.vocab_size
    attention = cfg.d_model * (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.d_model
    mlp = cfg.d_model * cfg.hidden_size * (3 if cfg.gated else 2)
    layers = cfg.n_layers * (attention + mlp)
    if cfg.family == "seq2seq":  # decoder blocks: self- and cross-attention (same size), MLP
        layers += cfg.decoder_layers * (2 * attention + mlp)
    return layers + cfg.d_model * cfg.vocab_size


def lora_parameters(cfg: ModelConfig, r: int = 8, targets: tuple[str, ...] | list[str] = ("q", "v")) -> int:
    """Adapter parameters r·(in + out) per adapted projection per block, as `lmforge.peft.apply_lora` adds
    them (each of q, k, v its own pair; "qkv" one pair for the fused projection; cross_* in decoder blocks)."""
    if r < 1:
        raise UserError(f"lora rank r={r} must be a positive integer")
    d, q_out, kv_out, hidden = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_size
    shapes = {"q": (d, q_out), "k": (d, kv_out), "v": (d, kv_out), "qkv": (d, q_out + 2 * kv_out), "o": (q_out, d),
              "gate": (d, hidden), "up": (d, hidden), "down": (hidden, d), "cross_kv": (d, 2 * kv_out)}
    names = LORA_ALL if "all" in targets else tuple(targets)
    total = 0
    for name in names:
        if name not in LORA_TARGETS:
            raise UserError(f"lora target '{name}' is unknown; choose from {', '.join(LORA_TARGETS)} or 'all'")
        cross = name.startswith("cross_")
        if (name == "gate" and not cfg.gated) or (cross and cfg.family != "seq2seq"):
            continue  # no such projection in this model (lmforge's 'all' skips it the same way)
        fan_in, fan_out = shapes[name.removeprefix("cross_") if name != "cross_kv" else name]
        blocks = cfg.decoder_layers if cross else cfg.n_layers + (cfg.decoder_layers if cfg.family == "seq2seq" else 0)
        total += blocks * r * (fan_in + fan_out)
    return total


def block_linear_parameters(cfg: ModelConfig) -> int:
    """Weights of the blocks' Linear layers: what int8/int4/NF4 quantize (embeddings and head stay as they are)."""
    return matmul_parameters(cfg) - cfg.d_model * cfg.vocab_size


# -- bytes ----------------------------------------------------------------------------------------------------


def check_choice(name: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise UserError(f"{name}='{value}' is not supported; choose one of: {', '.join(choices)}")


def stored_bytes_per_weight(precision: str, fan_in: int) -> float:
    """Bytes per block-linear weight stored at `precision`, scales included."""
    check_choice("precision", precision, tuple(PRECISIONS))
    if precision == "int8":
        return 1 + 4 / fan_in
    if precision == "int4":
        return 0.5 + 5 / INT4_GROUP
    return PRECISIONS[precision]


def compute_bytes(precision: str) -> int:
    """Bytes of an activation (and of unquantized weights): fp32 stays fp32, anything else computes in 16 bit."""
    return 4 if precision == "fp32" else 2


@dataclass
class ModelMemory:
    """Bytes of one full (unsharded) copy of each training state, and the parameters behind them."""

    parameters: int
    trainable: int
    weights: float  # the model as stored: frozen base (quantized or not) + trainable weights
    gradients: float
    optimizer: float  # AdamW's two fp32 moments
    master: float  # fp32 master weights of mixed-precision training (0 in fp32)

    @property
    def training(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.master


def model_memory(cfg: ModelConfig, method: str = "full", precision: str = "fp32", lora_r: int = 8,
                 lora_targets: tuple[str, ...] | list[str] = ("q", "v")) -> ModelMemory:
    """Weights, gradients, optimizer moments and master weights (bytes) for training `cfg` by `method`.

    full: every parameter trains (int8/int4 cannot: train in fp32/bf16/fp16, or fine-tune a quantized base with
    lora/qlora). lora: the base is frozen at `precision` (int8/int4 quantize the block linears only, as lmforge
    does); qlora: the block linears are NF4. Adapters train in fp32 either way (4 + 4 + 8 bytes each)."""
    check_choice("method", method, METHODS)
    check_choice("precision", precision, tuple(PRECISIONS))
    total = count_parameters(cfg)
    if method == "full":
        if precision in ("int8", "int4"):
            raise UserError(f"--method full trains every weight, which {precision} cannot hold; use --precision "
                            "fp32|bf16|fp16, or --method lora/qlora to fine-tune a quantized base")
        mixed = precision != "fp32"
        return ModelMemory(total, total, total * PRECISIONS[precision], total * PRECISIONS[precision],
                           total * ADAM_BYTES, total * 4.0 if mixed else 0.0)
    adapters = lora_parameters(cfg, lora_r, lora_targets)
    linear = block_linear_parameters(cfg)
    per_weight = NF4_BYTES if method == "qlora" else stored_bytes_per_weight(precision, cfg.d_model)
    base = linear * per_weight + (total - linear) * compute_bytes(precision)
    return ModelMemory(total + adapters, adapters, base + 4.0 * adapters, 4.0 * adapters, ADAM_BYTES * adapters, 0.0)


def inference_weight_bytes(cfg: ModelConfig, precision: str = "fp32") -> float:
    """The model held for inference: block linears at `precision`, everything else in the compute dtype."""
    linear = block_linear_parameters(cfg)
    rest = count_parameters(cfg) - linear
    return linear * stored_bytes_per_weight(precision, cfg.d_model) + rest * compute_bytes(precision)


def kv_cache_bytes(cfg: ModelConfig, batch: int, tokens: int, precision: str = "bf16") -> int:
    """2 (keys, values) · layers · kv_heads · head_dim · bytes · batch · tokens: the self-attention cache of
    decoding (the decoder's, for seq2seq, whose cross-attention keys/values add the same per source token)."""
    layers = cfg.decoder_layers if cfg.family == "seq2seq" else cfg.n_layers
    return 2 * layers * cfg.kv_heads * cfg.head_dim * compute_bytes(precision) * batch * tokens


# -- activations -------------------------------------------------------------------------------------------


def norm_activation_elements(cfg: ModelConfig) -> int:
    """Values per token a norm keeps, its input and output included: LayerNorm its input, mean and rstd and (as
    the next matmul's input) its output, 2·d + 2; lmforge's RMSNorm also the normalised x before the gain, 3·d + 1."""
    return 2 * cfg.d_model + 2 if cfg.norm == "layernorm" else 3 * cfg.d_model + 1


def fused_attention(cfg: ModelConfig) -> bool:
    """Whether training attention runs in a fused (flash) kernel: not with T5's relative bias, an additive float
    mask that sends scaled_dot_product_attention down its math path, which keeps the T×T softmax."""
    return cfg.positions != "relative"


def attention_activation_elements(cfg: ModelConfig, seq_len: int, cross: bool = False) -> int:
    """One attention's saved values per token (see `block_activation_elements`)."""
    hd, heads, kv = cfg.head_dim, cfg.n_heads, cfg.kv_heads
    fused = cross or fused_attention(cfg)
    softmax = heads if fused else heads * seq_len  # log-sum-exp per head, or the whole softmax row
    rope = (heads + kv) * hd if cfg.positions == "rope" and not cross else 0
    return (heads + 2 * kv) * hd + rope + heads * hd + softmax


def block_activation_elements(cfg: ModelConfig, seq_len: int, cross: bool = False) -> int:
    """Values per token that one lmforge block keeps for its backward pass (dropout off, as by default):

        2 · norm               each norm's input, statistics and output (`norm_activation_elements`): the
                               block input, attention input, residual sum and MLP input; 2·d + 2 for LayerNorm
      + (H + 2·K)·hd           the fused qkv projection's output (q, k, v are views of it)
      + (H + K)·hd             rotated q and k (RoPE only)
      + H·hd                   the attention output (the out projection's input, a view of it)
      + H or H·T               the fused kernel's log-sum-exp per head, or the unfused path's T×T softmax
      + 2·F                    plain MLP: the up projection's output and the activation's output (ReLU
                               keeps only its output: F); gated 4·F: up's 2·F output, act(gate), and
                               act(gate)·up as the down projection's input

    (H heads, K key/value heads, hd head_dim, F the MLP width, T the sequence length.) A decoder block of an
    encoder-decoder adds a cross-attention: a norm, queries H·hd, the memory's keys/values 2·K·hd (counted per
    token for equal source and target lengths), H and H·hd. Korthikanti et al. 2022's 34·d + 5·H·T bytes at 16
    bit is the same count for GPT-2 with dropout masks and an unfused softmax; lmforge's GPT-2 block is 16·d + H
    + 4 values, e.g. 16·d·4 bytes in fp32 (the norm statistics and log-sum-exp are the H + 4).
    """
    hidden = cfg.hidden_size
    mlp = hidden * (4 if cfg.gated else 1 if cfg.mlp == "relu" else 2)
    elements = 2 * norm_activation_elements(cfg) + attention_activation_elements(cfg, seq_len) + mlp
    if cross:
        elements += norm_activation_elements(cfg) + attention_activation_elements(cfg, seq_len, cross=True)
    return elements


def head_activation_elements(cfg: ModelConfig) -> int:
    """Values per token saved outside the blocks (besides the fp32 log-softmax): the final norm of a pre-norm
    stack (the last block's output enters it); after post-norm blocks, the summed embeddings the first block
    reads (its own norms hold the rest), or BERT's embedding norm; BERT's MLM head (dense output, norm)."""
    elements = norm_activation_elements(cfg) if cfg.norm_placement == "pre" else 0 if cfg.embed_norm else cfg.d_model
    if cfg.embed_norm:
        elements += norm_activation_elements(cfg)
    if cfg.family == "masked" and cfg.head == "lm":
        elements += cfg.d_model + norm_activation_elements(cfg)
    return elements


def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, precision: str = "fp32",
                     checkpointing: bool = False) -> dict[str, float]:
    """Bytes of saved activations for one micro-batch of batch × seq_len tokens in training.

    Without checkpointing every block keeps `block_activation_elements` per token. With per-block activation
    checkpointing a block keeps only its input (d per token), and backward recomputes one block at a time,
    which then holds one block's full set ("recompute"). The head keeps `head_activation_elements` per token per
    stack, the fp32 log-softmax over the vocabulary that cross-entropy keeps (4·V bytes; an encoder without an
    LM head has none), and the int64 token ids and labels (8 bytes each)."""
    tokens, size = batch * seq_len, compute_bytes(precision)
    stacks = [(cfg.n_layers, False)] if cfg.family != "seq2seq" else [(cfg.n_layers, False),
                                                                         (cfg.decoder_layers, True)]
    blocks, working = 0.0, 0.0
    for layers, cross in stacks:
        full = block_activation_elements(cfg, seq_len, cross) * tokens * size
        blocks += layers * (cfg.d_model * tokens * size if checkpointing else full)
        working = max(working, full if checkpointing else 0.0)
    vocab = cfg.vocab_size if cfg.family != "masked" or cfg.head == "lm" else 0
    ids = 8 * tokens * (len(stacks) + 1)
    head = head_activation_elements(cfg) * tokens * size * len(stacks) + 4 * vocab * tokens + ids
    return {"blocks": blocks, "recompute": working, "head": head, "total": blocks + working + head}


def activation_bytes_per_token_per_layer(cfg: ModelConfig, seq_len: int, precision: str = "fp32",
                                         checkpointing: bool = False) -> float:
    """The per-layer, per-token figure of `activation_bytes` (a decoder-only or encoder block)."""
    if checkpointing:
        return cfg.d_model * compute_bytes(precision)
    return block_activation_elements(cfg, seq_len) * compute_bytes(precision)


# -- sharding --------------------------------------------------------------------------------------------


def per_device_memory(memory: ModelMemory, activations: float, world_size: int = 1, distributed: str = "none",
                      gathered: float = 0.0, buffers: float = 0.0) -> dict[str, float]:
    """Bytes on each of `world_size` devices (Rajbhandari et al. 2020): DDP replicates everything; ZeRO-1 shards
    the optimizer state (moments and fp32 master), ZeRO-2 also the gradients, ZeRO-3 also the weights. Activations
    are per device already. An FSDP engine shards the weights at ZeRO-2 too and gathers them for compute:
    `gathered` is what it holds unsharded beside its 1/N shard (the paper's ZeRO-2 is gathered = W·(1 - 1/N); see
    `lmforge_sharding` for lmforge's); `buffers`: communication buffers (DDP's gradient buckets).

    "total" adds everything up, the textbook count. "peak" is when the device is fullest: gradients appear as
    backward frees the activations (the loop zeroes gradients to None after each step), so at most
    max(activations, gradients) of the two are held at once, beside the weights, optimizer state and buffers."""
    check_choice("distributed", distributed, DISTRIBUTED)
    if world_size < 1:
        raise UserError(f"world_size={world_size} must be >= 1")
    if distributed == "none" and world_size != 1:
        raise UserError(f"world_size={world_size} needs --distributed ddp|zero1|zero2|zero3")
    stage = DISTRIBUTED.index(distributed) - 1  # none/ddp -> <= 0
    n = world_size

    def share(value: float, from_stage: int) -> float:
        return value / n if stage >= from_stage else value

    weights = share(memory.weights, 2) + (gathered if stage >= 2 else 0.0)
    out = {"weights": weights, "gradients": share(memory.gradients, 2),
           "optimizer": share(memory.optimizer + memory.master, 1), "buffers": buffers, "activations": activations}
    out["total"] = sum(out.values())
    out["peak"] = out["total"] - min(out["activations"], out["gradients"])
    return out


def lmforge_sharding(cfg: ModelConfig, memory: ModelMemory, distributed: str, world_size: int
                     ) -> tuple[float, float]:
    """(gathered, buffers) of lmforge's engine (`lmforge.train.distributed`), for `per_device_memory`.

    DDP and ZeRO-1 keep gradient buckets beside the gradients (PyTorch's default gradient_as_bucket_view=False):
    a second copy of the trained gradients. FSDP2 shards each block and the root (embeddings, head, norms); ZeRO-2
    (reshard_after_forward=False) keeps every gathered weight from forward to backward, the whole model beside its
    shard; ZeRO-3 holds the root's weights through forward and backward plus two blocks (the one computing and
    the one prefetched)."""
    if world_size == 1 or distributed == "none":
        return 0.0, 0.0
    if distributed in ("ddp", "zero1"):
        return 0.0, memory.gradients
    per_param = memory.weights / max(memory.parameters, 1)
    if distributed == "zero2":
        return memory.weights, 0.0
    cross = cfg.family == "seq2seq"
    blocks = cfg.n_layers * block_parameters(cfg) + (cfg.decoder_layers * block_parameters(cfg, cross) if cross else 0)
    root = count_parameters(cfg) - blocks
    return (root + 2 * block_parameters(cfg, cross)) * per_param, 0.0


def logits_gradient_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """The fp32 gradients of the log-softmax and of the logits that exist together when backward starts."""
    return 2 * 4 * cfg.vocab_size * batch * seq_len if cfg.family != "masked" or cfg.head == "lm" else 0.0


# -- compute ----------------------------------------------------------------------------------------------


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, training: bool = True) -> float:
    """6N + 12·L·T·(H·hd) for a training step (forward + backward); a third of that for inference.

    N counts the matmul weights; the attention term is QK^T and AV over a T-token context (the PaLM /
    nanoGPT convention, which does not halve for the causal mask). An encoder-decoder, per (source, target)
    token pair of equal lengths T, attends in the encoder's self-attention and in the decoder's self- and
    cross-attention: (L_enc + 2·L_dec) attention terms.
    """
    seq_len = seq_len or cfg.context_length
    attentions = cfg.n_layers + (2 * cfg.decoder_layers if cfg.family == "seq2seq" else 0)
    if cfg.arch != "transformer":
        attentions = 0  # a recurrent model carries a state, not a context it attends over
    forward = 2 * matmul_parameters(cfg) + 4 * attentions * seq_len * cfg.n_heads * cfg.head_dim
    return forward * (3 if training else 1)


def training_flops(n_params: int, tokens: int) -> float:
    """Total training compute C ≈ 6·N·D (forward 2ND + backward 4ND)."""
    return 6.0 * n_params * tokens


def petaflop_s_days(flops: float) -> float:
    return flops / PETAFLOP_S_DAY


def gpu_days(flops: float, gpu: str = "a100", mfu: float = 0.4) -> float:
    """Days on one `gpu` at model-FLOPs utilisation `mfu` of its dense 16-bit peak."""
    check_choice("gpu", gpu, tuple(GPUS))
    if not 0 < mfu <= 1:
        raise UserError(f"mfu={mfu} must be in (0, 1], e.g. 0.4")
    return flops / (GPUS[gpu] * mfu * 86400)


def compute_optimal_tokens(n_params: int) -> int:
    """Training tokens that make a model of n_params compute-optimal (the Chinchilla rule of thumb)."""
    return CHINCHILLA_TOKENS_PER_PARAMETER * n_params


def chinchilla_rule(compute: float) -> tuple[float, float]:
    """(N, D) with D = 20·N and C = 6·N·D, i.e. N = sqrt(C / 120)."""
    n = math.sqrt(compute / (6 * CHINCHILLA_TOKENS_PER_PARAMETER))
    return n, CHINCHILLA_TOKENS_PER_PARAMETER * n


def chinchilla_loss(n_params: float, tokens: float) -> float:
    """Hoffmann et al.'s fitted L(N, D) = E + A/N^α + B/D^β (nats per token on their data)."""
    law = CHINCHILLA_LAW
    return law["E"] + law["A"] / n_params ** law["alpha"] + law["B"] / tokens ** law["beta"]


def chinchilla_optimum(compute: float) -> tuple[float, float]:
    """(N, D) minimising L(N, D) subject to 6·N·D = C, in closed form: with a = β/(α+β), b = α/(α+β) and
    G = (αA / (βB))^(1/(α+β)), N_opt = G·(C/6)^a and D_opt = (C/6)^b / G."""
    if compute <= 0:
        raise UserError(f"compute={compute} must be a positive number of FLOPs")
    law = CHINCHILLA_LAW
    alpha, beta = law["alpha"], law["beta"]
    g = (alpha * law["A"] / (beta * law["B"])) ** (1 / (alpha + beta))
    n = g * (compute / 6) ** (beta / (alpha + beta))
    return n, compute / (6 * n)


# -- measured peaks and rules of thumb (used by the training loop and pretrain) ----------------------------------


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
    """The seeds' rule of thumb for training without sharding: ~24 bytes per parameter (weights 4 + gradients 4
    + Adam 8 + "activations and temporary memory" 8); `model_memory` and `activation_bytes` are the real count."""
    return n_params * bytes_per_param
