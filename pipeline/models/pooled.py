"""The last transformer block computed at the pooled position only: the same features for less compute.

CLIP towers read one position after their last block: the class token in the image tower (pool_type 'tok'),
the end-of-text token in the text tower. Every other position of the last block's output is thrown away, yet
the plain forward runs the attention output projection and the MLP on all of them. Here the last block runs
its key/value projection on every position (attention needs them) and everything else on the pooled one:
10/12 of one block's matmul work, about 7% of a 12-layer tower. Used only where the structure is the plain
open_clip one (checked per model), and the model is checked once at load against the plain forward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def _plain_block(block: Any) -> bool:
    from open_clip.transformer import ResidualAttentionBlock

    from pipeline.models.quantize import SelfAttention, plain_self_attention

    attn = getattr(block, "attn", None)
    return (
        type(block) is ResidualAttentionBlock
        and not hasattr(block, "ln_1_kv")
        and (
            isinstance(attn, SelfAttention) or (isinstance(attn, nn.MultiheadAttention) and plain_self_attention(attn))
        )
    )


def _plain_transformer(transformer: Any) -> bool:
    from open_clip.transformer import Transformer

    return (
        type(transformer) is Transformer
        and transformer.batch_first
        and len(transformer.resblocks) > 0
        and _plain_block(transformer.resblocks[-1])
    )


def can_pool_image(model: Any) -> bool:
    """open_clip's VisionTransformer with class-token pooling and no attentional pooler."""
    from open_clip.transformer import VisionTransformer

    visual: Any = getattr(model, "visual", None)
    return (
        type(visual) is VisionTransformer
        and visual.attn_pool is None
        and visual.pool_type == "tok"
        and not visual.output_tokens
        and _plain_transformer(visual.transformer)
    )


def can_pool_text(model: Any) -> bool:
    """CLIP's own text tower (trimmable, see openclip._can_trim_text) with a plain last block."""
    return _plain_transformer(getattr(model, "transformer", None))


def block_at(block: Any, x: torch.Tensor, pos: torch.Tensor, causal: bool) -> torch.Tensor:
    """`block(x)[arange(B), pos]` without computing the other positions' outputs; x is (B, L, D).

    With `causal`, the pooled position attends to positions <= pos only (the text tower's causal mask row).
    """
    attn = block.attn
    rows = torch.arange(x.shape[0], device=x.device)
    b, length, d = x.shape
    heads = attn.num_heads
    h = block.ln_1(x)
    hq = h[rows, pos]  # (B, D)
    if isinstance(attn, nn.MultiheadAttention):
        w, bias = attn.in_proj_weight, attn.in_proj_bias
        q = F.linear(hq, w[:d], None if bias is None else bias[:d])
        kv = F.linear(h, w[d:], None if bias is None else bias[d:])
    else:  # SelfAttention (int8 path): one packed projection, possibly quantized
        qkv = attn.in_proj(h)
        q, kv = qkv[rows, pos, :d], qkv[..., d:]
    kv = kv.view(b, length, 2, heads, d // heads).permute(2, 0, 3, 1, 4)  # (2, B, H, L, hd)
    q = q.view(b, heads, 1, d // heads)
    mask = None
    if causal:
        mask = (torch.arange(length, device=x.device)[None, :] <= pos[:, None]).view(b, 1, 1, length)
    out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask).reshape(b, d)
    y = x[rows, pos] + block.ls_1(attn.out_proj(out))
    return y + block.ls_2(block.mlp(block.ln_2(y)))  # type: ignore[no-any-return]


def run_blocks_pooled(transformer: Any, x: torch.Tensor, pos: torch.Tensor, attn_mask: Any, causal: bool) -> Any:
    """All blocks but the last as usual, the last at `pos` only: (B, D) features of the pooled positions."""
    for block in transformer.resblocks[:-1]:
        x = block(x, attn_mask=attn_mask)
    return block_at(transformer.resblocks[-1], x, pos, causal)


def encode_image_pooled(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip's `model.encode_image` (unnormalized) with the last block at the class token only."""
    visual = model.visual
    x = visual._embeds(pixels)
    pos = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    pooled = visual.ln_post(run_blocks_pooled(visual.transformer, x, pos, None, causal=False))
    return pooled @ visual.proj if visual.proj is not None else pooled


def text_pool_positions(model: Any, text: torch.Tensor) -> torch.Tensor:
    """The position `text_global_pool` reads for each row (argmax: end-of-text id is the largest; eos: its id)."""
    if model.text_pool_type == "argmax":
        return text.argmax(dim=-1)
    return (text == model.text_eos_id).int().argmax(dim=-1)


def check_pooled(
    model: Any,
    image_size: tuple[int, int] | None,
    tokens: torch.Tensor | None,
    encode_text_pooled: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[bool, bool]:
    """Whether the pooled paths give the plain forward's features on this model (cosine > 0.99999 per row).

    `encode_text_pooled(model, tokens)` is the caller's text path with the pooled last block (the padding-trimmed
    forward of openclip.py), compared with open_clip's own encode_text; without it the text path is not checked."""

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool((F.cosine_similarity(a.float(), b.float(), dim=-1) > 0.99999).all())

    gen = torch.Generator().manual_seed(0)
    image_ok = text_ok = False
    with torch.inference_mode():
        if image_size is not None:
            device = next(model.visual.parameters()).device
            px = torch.randn((1, 3, *image_size), generator=gen).to(device)
            image_ok = same(encode_image_pooled(model, px), model.encode_image(px))
        if tokens is not None and encode_text_pooled is not None:
            text_ok = same(encode_text_pooled(model, tokens), model.encode_text(tokens))
    return image_ok, text_ok
