"""Grouped decode attention for the text model (``engine.hf.decode_attention: grouped``).

Qwen2.5-VL's text model has fewer KV heads than query heads (7B: 28 share 4). transformers' SDPA
path copies each KV head out to its query heads at every step a mask is passed (a left-padded
batch always does): the whole cache written again ``heads / kv_heads`` times a layer. In a decode
step each query head has one query, so a group's query heads stand as its KV head's queries:
``(B, heads, 1, D)`` viewed as ``(B, kv_heads, group, D)``, attention over the uncopied cache with
the mask broadcast, the output viewed back: equal to stock to float rounding
(``tests/engines/test_hf_gqa.py``). Prefill and anything unusual go to transformers' own SDPA.
Installed by registering :func:`grouped_decode_attention` under :data:`NAME` and naming it in the
text model's config (switchable on a loaded model, both ways); only a text model on ``sdpa`` is
switched. Written against transformers 4.57.3 and 5.x; any other shape raises ``ValueError``
saying to set ``engine.hf.decode_attention: stock``.
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
