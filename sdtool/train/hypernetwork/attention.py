"""The U-Net side of a hypernetwork: attention processors that compute `k = to_k(hn_k(context))` and
`v = to_v(hn_v(context))` with `hn(x) = x + mlp(x)·m`, on PyTorch SDPA or xformers; the U-Net itself is untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from sdtool.errors import ConfigError, MissingDependencyError, ModelError
from sdtool.train.hypernetwork.network import Hypernetwork
from sdtool.train.hypernetwork.structure import HypernetworkModule

AttentionBackend = Literal["auto", "sdpa", "xformers"]


def _attention_modules(unet: nn.Module) -> Iterator[tuple[str, Any]]:
    from diffusers.models.attention_processor import Attention

    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            yield name, module


def context_widths(unet: nn.Module) -> list[int]:
    """The attention context widths of a U-Net: block channels (self-attention) and cross_attention_dim."""
    widths = {module.to_k.in_features for _, module in _attention_modules(unet)}
    if not widths:
        raise ModelError("this U-Net has no attention layers for a hypernetwork to act on")
    return sorted(widths)


def _apply_mlp(module: HypernetworkModule, context: torch.Tensor) -> torch.Tensor:
    # The MLP runs in its own dtype (usually fp32 while the U-Net is fp16), as A1111 does, and hands back the
    # U-Net's dtype.
    dtype = next(module.parameters()).dtype
    return module(context.to(dtype)).to(context.dtype)


class HypernetworkAttnProcessor:
    """Diffusers' `AttnProcessor2_0` (SDPA) with the key and value computed from `hn_k(context)`/`hn_v(context)`.

    Everything else is the stock processor's code, line for line, so that with a zero MLP the output is identical.
    `original` is the processor it replaced, restored by `remove_hypernetwork`.
    """

    def __init__(self, hn_k: HypernetworkModule, hn_v: HypernetworkModule, original: Any):
        self.hn_k = hn_k
        self.hn_v = hn_v
        self.original = original

    def _key_value(self, attn: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attn.to_k(_apply_mlp(self.hn_k, context)), attn.to_v(_apply_mlp(self.hn_v, context))

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        # The steps of diffusers' processors; only the key/value context and the attention kernel differ.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, key_tokens, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = self._prepare_mask(attn, attention_mask, key_tokens, batch_size, hidden_states.shape[1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = self._key_value(attn, encoder_hidden_states)

        hidden_states = self._attend(attn, query, key, value, attention_mask, batch_size)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _prepare_mask(
        self, attn: Any, mask: torch.Tensor | None, key_tokens: int, batch_size: int, query_tokens: int
    ) -> torch.Tensor | None:
        if mask is None:
            return None
        mask = attn.prepare_attention_mask(mask, key_tokens, batch_size)
        # SDPA expects the mask as (batch, heads, source_length, target_length).
        return mask.view(batch_size, attn.heads, -1, mask.shape[-1])

    def _attend(
        self,
        attn: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        batch_size: int,
    ) -> torch.Tensor:
        """As `AttnProcessor2_0`: split heads, optional q/k norms, SDPA, merge heads."""
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        return hidden_states.to(query.dtype)


def _xformers_ops() -> Any:
    try:
        import xformers.ops
    except ImportError as e:
        raise MissingDependencyError("xformers", "hypernetwork attention with xformers") from e
    return xformers.ops


class HypernetworkXFormersAttnProcessor(HypernetworkAttnProcessor):
    """Diffusers' `XFormersAttnProcessor` with the key and value computed from `hn_k(context)`/`hn_v(context)`."""

    def __init__(
        self, hn_k: HypernetworkModule, hn_v: HypernetworkModule, original: Any, attention_op: Callable | None = None
    ):
        super().__init__(hn_k, hn_v, original)
        self.attention_op = attention_op
        self.ops = _xformers_ops()

    def _prepare_mask(
        self, attn: Any, mask: torch.Tensor | None, key_tokens: int, batch_size: int, query_tokens: int
    ) -> torch.Tensor | None:
        mask = attn.prepare_attention_mask(mask, key_tokens, batch_size)
        if mask is not None:
            # xformers does not broadcast the singleton query dimension of the bias.
            mask = mask.expand(-1, query_tokens, -1)
        return mask

    def _attend(
        self,
        attn: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        batch_size: int,
    ) -> torch.Tensor:
        """As `XFormersAttnProcessor`: heads into the batch, memory-efficient attention, heads back."""
        query = attn.head_to_batch_dim(query).contiguous()
        key = attn.head_to_batch_dim(key).contiguous()
        value = attn.head_to_batch_dim(value).contiguous()
        hidden_states = self.ops.memory_efficient_attention(
            query, key, value, attn_bias=mask, op=self.attention_op, scale=attn.scale
        )
        hidden_states = hidden_states.to(query.dtype)
        return attn.batch_to_head_dim(hidden_states)


def apply_hypernetwork(
    unet: nn.Module,
    hypernetwork: Hypernetwork,
    multiplier: float = 1.0,
    *,
    attention: AttentionBackend = "auto",
    strict: bool = True,
) -> int:
    """Install hypernetwork attention processors on every U-Net attention layer; returns how many were patched.

    `attention`: "sdpa", "xformers" (an error when xformers is missing) or "auto" (xformers where the layer already
    used diffusers' xformers processor, else SDPA). `strict`: every context width of the U-Net must have a (k, v)
    pair (a file made for another model is refused); otherwise layers without one keep their processor, as in A1111.
    The hypernetwork moves to the U-Net's device; `multiplier` is its strength in eval mode. Call it after choosing
    the U-Net's attention implementation (`enable_xformers_memory_efficient_attention` would replace these).
    """
    from diffusers.models.attention_processor import XFormersAttnProcessor

    if attention not in ("auto", "sdpa", "xformers"):
        raise ConfigError(f"unknown attention backend {attention!r} for the hypernetwork (auto, sdpa or xformers)")
    remove_hypernetwork(unet)
    layers = list(_attention_modules(unet))
    missing = sorted({m.to_k.in_features for _, m in layers} - set(hypernetwork.widths))
    if strict and missing:
        raise ModelError(
            f"the hypernetwork has no layers for the U-Net's attention context width(s) {missing} "
            f"(it has {hypernetwork.widths})",
            hint="it was made for a different model (e.g. SD 1.x vs 2.x)",
        )
    try:
        device = next(unet.parameters()).device
    except StopIteration:
        device = None
    if device is not None:
        hypernetwork.to(device)
    hypernetwork.set_multiplier(multiplier)

    patched = 0
    for _, attn in layers:
        pair = hypernetwork.pair(attn.to_k.in_features)
        if pair is None:
            continue
        original = attn.processor
        if attention == "xformers" or (attention == "auto" and isinstance(original, XFormersAttnProcessor)):
            op = getattr(original, "attention_op", None)
            processor: HypernetworkAttnProcessor = HypernetworkXFormersAttnProcessor(*pair, original, op)
        else:
            processor = HypernetworkAttnProcessor(*pair, original)
        attn.set_processor(processor)
        patched += 1
    if patched == 0:
        raise ModelError(
            f"the hypernetwork's widths {hypernetwork.widths} match none of the U-Net's attention layers "
            f"({context_widths(unet)})"
        )
    return patched


def remove_hypernetwork(unet: nn.Module) -> int:
    """Put back the attention processors `apply_hypernetwork` replaced; returns how many were restored."""
    restored = 0
    for _, attn in _attention_modules(unet):
        if isinstance(attn.processor, HypernetworkAttnProcessor):
            attn.set_processor(attn.processor.original)
            restored += 1
    return restored
