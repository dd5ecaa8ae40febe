"""int8 dynamic quantization for CPU inference, including the attention projections torch would skip.

`torch.ao.quantization.quantize_dynamic` only converts `nn.Linear` modules. `nn.MultiheadAttention` keeps its
input projection as a bare parameter and its output projection as a `NonDynamicallyQuantizableLinear`, so in a
ViT a third of the matmul work (4·d² of the 12·d² per block) stayed fp32. `SelfAttention` is the same
computation with both projections as plain `nn.Linear`, so they quantize too; swapped in before quantizing, it
took the ViT-B-32 image tower from 1.3x to 1.8x the fp32 speed on this 2-core CPU (see README, performance).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def plain_self_attention(mha: nn.MultiheadAttention) -> bool:
    """Same q/k/v width, no bias_k/bias_v, no zero attention: the attention SelfAttention and pooled.py compute."""
    return bool(mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn)


class SelfAttention(nn.Module):
    """`nn.MultiheadAttention` for self-attention without weights output, with `nn.Linear` projections."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not plain_self_attention(mha):
            raise ValueError("only plain self-attention (same q/k/v width, no bias_k, no zero attention) converts")
        d = mha.embed_dim
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.in_proj = nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None)
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        **unsupported: Any,
    ) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query or need_weights or any(v is not None for v in unsupported.values()):
            raise ValueError("SelfAttention takes self-attention calls only (key is value is query, no weights)")
        x = query if self.batch_first else query.transpose(0, 1)
        b, length, d = x.shape
        qkv = self.in_proj(x).view(b, length, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = attn_mask
        if mask is not None and mask.dtype == torch.bool:
            mask = ~mask  # nn.MultiheadAttention: True = masked out; scaled_dot_product_attention: True = attend
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


def linearize_self_attention(model: nn.Module) -> int:
    """Replace the self-attention `nn.MultiheadAttention` of open_clip's residual blocks in place; returns the count.

    Only blocks without a separate key/value norm (`ln_1_kv`, present on cross-attention blocks) are touched:
    their `attention()` always passes the same tensor as query, key and value.
    """
    from open_clip.transformer import ResidualAttentionBlock

    swapped = 0
    for mod in model.modules():
        if (
            isinstance(mod, ResidualAttentionBlock)
            and isinstance(mod.attn, nn.MultiheadAttention)
            and not hasattr(mod, "ln_1_kv")
        ):
            mod.attn = SelfAttention(mod.attn)
            swapped += 1
    return swapped


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 (per-tensor weights, activations quantized per batch) of every `nn.Linear`, on the CPU."""
    with warnings.catch_warnings():
        # torch 2.14 marks torch.ao.quantization deprecated in favour of torchao, which is not a dependency here;
        # the eager dynamic path still works and is what we measured. The warnings would repeat in every worker.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def quantized_fraction(model: nn.Module) -> float:
    """Share of matmul weights (Linear + attention in-projections) stored as int8, for logs and tests."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    total = quantized = 0
    for mod in model.modules():
        if isinstance(mod, QLinear):
            n = mod.in_features * mod.out_features
            total += n
            quantized += n
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel()
        elif isinstance(mod, nn.MultiheadAttention) and mod.in_proj_weight is not None:
            total += mod.in_proj_weight.numel()
    return quantized / total if total else 0.0
