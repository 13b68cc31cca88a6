"""Grouped decode attention for the text model (hf engine, ``engine.hf.decode_attention``).

Qwen2.5-VL's text model has fewer key/value heads than query heads (7B: 28 query heads share 4
KV heads; 3B: 16 share 2). transformers' SDPA path copies each KV head out to its query heads
(``repeat_kv``) whenever an attention mask is passed, which a left-padded batch always does:
PyTorch's own grouped path (``enable_gqa``) would fall back to its math kernel with a mask.
4.57.3 and 5.17 do so at every decode step; 5.24 packs the queries as below in eager decode but
still copies under ``torch.compile`` (our compiled decode). For one new token a step, that copy
writes the whole cache over again ``heads / kv_heads`` times, in every layer: on the 7B at B=128
and a 384-token cache, ~1.4 GB of memory traffic a layer where the attention itself needs 0.1 GB.

In a decode step each query head has one query, which attends to its group's keys under the
same padding mask as the other heads of its group. So the group's query heads can stand as that
KV head's queries: ``(B, heads, 1, D)`` viewed as ``(B, kv_heads, group, D)`` (no copy), attention
over the uncopied ``(B, kv_heads, L, D)`` keys and values with the ``(B, 1, 1, L)`` mask broadcast
over the group, the output viewed back. Each (query head, key) pair meets the same arithmetic, so
the output equals the stock path's to float rounding (``tests/test_hf_gqa.py``). Prefill (many
queries under a causal mask) and anything else unusual go to transformers' own SDPA function.

Installed by registering :func:`grouped_decode_attention` with transformers' attention interface
and its SDPA mask function with the mask interface under :data:`NAME`, then naming it in the text
model's config (the configs the language model and its attention modules hold; the vision tower's
is untouched). The attention modules look their function up by that name on every call, so the
switch works on a loaded model, both ways. Only a text model on ``sdpa`` is switched; ``eager``
and flash attention stay as they are. Written against transformers 4.57.3 and 5.x (the text
model at ``model.model.language_model``, attention modules with ``num_key_value_groups``); any
other shape raises ``ValueError`` saying to set ``engine.hf.decode_attention: stock``.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "qvl_grouped_sdpa"  # the attention implementation's name, as registered
_STOCK = "sdpa"


def _fail(what: str) -> ValueError:
    import transformers

    return ValueError(
        f"grouped decode attention: transformers {transformers.__version__}: {what}; set "
        "engine.hf.decode_attention: stock"
    )


def grouped_decode_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function signature: ``query (B, heads, q, D)``, ``key`` and
    ``value (B, kv_heads, L, D)``; returns ``(B, q, heads, D)`` and no weights. One query a head
    runs grouped; everything else runs transformers' own SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    if q_len != 1 or groups == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    kv_heads = heads // groups
    mask = attention_mask
    if mask is not None and mask.shape[1] != 1:  # one mask a query head: grouped as the queries
        mask = mask.reshape(mask.shape[0], kv_heads, groups, mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(batch, kv_heads, groups, dim),  # a KV head's query heads as its queries
        key,
        value,
        attn_mask=mask,  # (B, 1, 1, L): broadcast over the kv heads and their queries
        dropout_p=dropout,
        scale=scaling,
    )
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, grouped_decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _text_configs(model: Any) -> list[Any]:
    """The config objects the text model and its attention modules read their attention
    implementation from (one object, or copies of it)."""
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if language_model is None:
        raise _fail(f"no text model at model.model.language_model ({type(model).__name__})")
    attention = [m for m in language_model.modules() if hasattr(m, "num_key_value_groups")]
    if not attention or any(not hasattr(m, "config") for m in attention):
        raise _fail("no attention modules with num_key_value_groups and a config in the text model")
    configs: dict[int, Any] = {id(language_model.config): language_model.config}
    for m in attention:
        configs.setdefault(id(m.config), m.config)
    return list(configs.values())


def enable_grouped_decode(model: Any) -> bool:
    """Switch the text model's attention to :data:`NAME`. False (left as it is) where the text
    model does not run ``sdpa``; raises ``ValueError`` for a model of an unknown shape."""
    configs = _text_configs(model)
    if any(c._attn_implementation not in (_STOCK, NAME) for c in configs):
        return False
    _register()
    for c in configs:
        c._attn_implementation = NAME
    return True


def disable_grouped_decode(model: Any) -> None:
    """Back to transformers' own SDPA function (nothing to undo in a model of unknown shape)."""
    try:
        configs = _text_configs(model)
    except ValueError:
        return
    for c in configs:
        if c._attn_implementation == NAME:
            c._attn_implementation = _STOCK


def is_grouped(model: Any) -> bool:
    return all(c._attn_implementation == NAME for c in _text_configs(model))
