"""Dense attention for the Qwen2.5-VL vision tower (``engine.hf.vision: dense``).

Without flash-attn, transformers runs the tower's window and full attention as one small call per
``cu_seqlens`` segment (128 images x 16 windows x 32 blocks at 448x448). :func:`enable_dense_vision`
replaces each vision block's attention ``forward`` (per module instance) with one that groups the
segments by length and runs each group as one batched call of the model's attention function; the
rotary position ids and window index are made once per run of equal grids and tiled
(:func:`_tiled`). Same arithmetic per segment: the output equals the stock forward's to float
rounding (``tests/engines/test_hf_vision.py``). Written against transformers 4.57.3 and 5.x (the
tower at ``model.model.visual``); any other shape raises ``ValueError`` saying to set
``engine.hf.vision: stock``; flash attention models stay stock.
"""

from __future__ import annotations

import inspect
import logging
import sys
import types
from typing import Any

import torch

log = logging.getLogger(__name__)

_ATTENTION_CLASS = "Qwen2_5_VLVisionAttention"
_TOWER_CLASS = "Qwen2_5_VisionTransformerPretrainedModel"
# The stock forward's parameters in the versions this was written against.
_KNOWN_SIGNATURES = {
    ("hidden_states", "cu_seqlens", "rotary_pos_emb", "position_embeddings", "kwargs"),  # 4.57
    ("hidden_states", "cu_seqlens", "position_embeddings", "max_seqlen", "kwargs"),  # 5.x
}
# Keyword arguments the stock forward names itself and does not pass to the attention function.
_OWN_KWARGS = ("position_embeddings", "rotary_pos_emb", "max_seqlen")
_DENSE_IMPLEMENTATIONS = ("sdpa", "eager")
# Most attention scores (segments x heads x L x L) one batched call may hold, should the kernel
# materialise them (eager does): 2^28 float32 scores are 1 GiB.
_MAX_SCORES = 1 << 28
_MARK = "_qvl_dense_vision"
# What _tile_positions sets on the tower instance (4.57: the two methods; 5.x: forward).
_TOWER_OVERRIDES = ("rot_pos_emb", "get_window_index", "forward")


def _fail(what: str) -> ValueError:
    import transformers

    return ValueError(
        f"dense vision attention: transformers {transformers.__version__}: {what}. The installed "
        "Qwen2.5-VL vision attention is not the shape qvl_batch.engines.hf.vision was written "
        "against (transformers 4.57.3 and 5.24); set engine.hf.vision: stock"
    )


def vision_tower(model: Any) -> Any:
    """The Qwen2.5-VL vision tower of ``model``: ``model.model.visual`` (4.57 and 5.x), or
    ``model.visual`` for the bare ``Qwen2_5_VLModel``, or ``model`` itself if it is the tower."""
    for tower in (
        getattr(getattr(model, "model", None), "visual", None),
        getattr(model, "visual", None),
        model,
    ):
        if tower is not None and type(tower).__name__ == _TOWER_CLASS:
            return tower
    raise _fail(f"no {_TOWER_CLASS} at model.model.visual or model.visual ({type(model).__name__})")


def _implementation(attn: Any) -> str | None:
    return getattr(getattr(attn, "config", None), "_attn_implementation", None)


def _check(attn: Any) -> types.ModuleType:
    """Raises ValueError unless ``attn`` is the vision attention this module was written against;
    returns its modeling module (where ``apply_rotary_pos_emb_vision`` lives)."""
    cls = type(attn)
    if cls.__name__ != _ATTENTION_CLASS:
        raise _fail(f"vision block attention is {cls.__name__}, expected {_ATTENTION_CLASS}")
    for name, kind in (("qkv", torch.nn.Linear), ("proj", torch.nn.Linear), ("num_heads", int)):
        if not isinstance(getattr(attn, name, None), kind):
            raise _fail(f"{_ATTENTION_CLASS} has no {kind.__name__} attribute {name!r}")
    if not isinstance(getattr(attn, "scaling", None), float):
        raise _fail(f"{_ATTENTION_CLASS} has no float attribute 'scaling'")
    dim = attn.qkv.in_features
    if attn.qkv.out_features != 3 * dim or dim % attn.num_heads or attn.proj.in_features != dim:
        raise _fail(
            f"{_ATTENTION_CLASS} qkv is {dim}->{attn.qkv.out_features} and proj takes "
            f"{attn.proj.in_features} with {attn.num_heads} heads, expected fused q/k/v of the "
            "hidden size"
        )
    params = tuple(inspect.signature(cls.forward).parameters)[1:]
    if params not in _KNOWN_SIGNATURES:
        raise _fail(f"{_ATTENTION_CLASS}.forward takes {params}")
    modeling = sys.modules.get(cls.__module__)
    for name in ("apply_rotary_pos_emb_vision", "eager_attention_forward"):
        if not callable(getattr(modeling, name, None)):
            raise _fail(f"{cls.__module__} has no function {name}")
    return modeling


def _attention_function(modeling: types.ModuleType, implementation: str):
    if implementation == "eager":
        return modeling.eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[implementation]


class _Plan:
    """How the tokens of one ``cu_seqlens`` fall into groups of equal-length segments.

    ``groups`` is ``[(length, count), ...]``; the tokens of a group's segments are contiguous after
    ``perm`` (None when the segments already are: one distinct length), ``inverse`` undoes it.
    """

    def __init__(self, cu_seqlens: torch.Tensor):
        cu = cu_seqlens.detach().to("cpu", torch.long)
        lengths = cu[1:] - cu[:-1]
        self.total = int(cu[-1]) if len(cu) else 0
        distinct = sorted({int(n) for n in lengths.unique().tolist()} - {0}, reverse=True)
        self.groups = [(n, int((lengths == n).sum())) for n in distinct]
        self.perm = self.inverse = None
        if len(distinct) > 1:
            starts = cu[:-1]
            perm = torch.cat(
                [
                    (starts[lengths == n, None] + torch.arange(n)).flatten()
                    for n, _count in self.groups
                ]
            )
            device = cu_seqlens.device
            self.perm = perm.to(device)
            self.inverse = torch.argsort(perm).to(device)


class _PlanCache:
    """Plans by ``cu_seqlens`` tensor identity: one tower forward passes the same two tensors
    (window and full) to every block, so the plan (and its device sync) is made once each. Holds
    the tensors, so an id is not reused while cached; a tensor changed in place is re-planned."""

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: list[tuple[torch.Tensor, int, _Plan]] = []

    @staticmethod
    def _version(tensor: torch.Tensor) -> int | None:
        # Inference-mode tensors (the engine's generate) keep no version counter.
        return None if tensor.is_inference() else tensor._version

    def get(self, cu_seqlens: torch.Tensor) -> _Plan:
        for tensor, version, plan in self.entries:
            if tensor is cu_seqlens and self._version(tensor) == version:
                return plan
        plan = _Plan(cu_seqlens)
        entry = (cu_seqlens, self._version(cu_seqlens), plan)
        self.entries = [entry, *self.entries][: self.size]
        return plan


def _make_forward(attn: Any, modeling: types.ModuleType, cache: _PlanCache):
    stock = type(attn).forward.__get__(attn)
    rotary = modeling.apply_rotary_pos_emb_vision

    def forward(self, hidden_states, cu_seqlens, *args, **kwargs):
        implementation = _implementation(self)
        cos_sin = kwargs.get("position_embeddings")
        if args or cos_sin is None or implementation not in _DENSE_IMPLEMENTATIONS:
            return stock(hidden_states, cu_seqlens, *args, **kwargs)
        plan = cache.get(cu_seqlens)
        seq = hidden_states.shape[0]
        if plan.total != seq:
            return stock(hidden_states, cu_seqlens, *args, **kwargs)
        extra = {k: v for k, v in kwargs.items() if k not in _OWN_KWARGS}
        function = _attention_function(modeling, implementation)
        dropout = self.attention_dropout if self.training else 0.0

        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).unbind(1)
        q, k = rotary(q, k, *cos_sin)
        if plan.perm is not None:
            q, k, v = (t.index_select(0, plan.perm) for t in (q, k, v))
        outputs = []
        start = 0
        for length, count in plan.groups:
            per_call = max(1, _MAX_SCORES // (self.num_heads * length * length))
            for first in range(0, count, per_call):
                n = min(per_call, count - first)
                end = start + n * length
                batch = [
                    t[start:end].reshape(n, length, self.num_heads, -1).transpose(1, 2)
                    for t in (q, k, v)
                ]
                out = function(
                    self,
                    *batch,
                    attention_mask=None,
                    scaling=self.scaling,
                    dropout=dropout,
                    is_causal=False,
                    **extra,
                )[0]  # (n, length, heads, head_dim)
                outputs.append(out.reshape(n * length, -1))
                start = end
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        if plan.inverse is not None:
            out = out.index_select(0, plan.inverse)
        return self.proj(out)

    forward.stock = stock
    return forward


def _attention_modules(model: Any) -> list[Any]:
    tower = vision_tower(model)
    blocks = getattr(tower, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks):
        raise _fail(f"{_TOWER_CLASS} has no blocks")
    modules = [getattr(block, "attn", None) for block in blocks]
    if any(m is None for m in modules):
        raise _fail("a vision block has no 'attn'")
    return modules


def _self_check(attn: Any) -> None:
    """Dense vs stock on random segments of three lengths; raises ValueError if they differ."""
    param = attn.qkv.weight
    if param.device.type == "meta":
        return
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 3, 5, 7, 3]
    seq, dim = sum(lengths), attn.qkv.in_features
    head_dim = dim // attn.num_heads
    hidden = torch.randn(seq, dim, generator=generator).to(param.device, param.dtype)
    angles = torch.randn(seq, head_dim, generator=generator).to(param.device, param.dtype)
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu = cu.to(param.device)
    cos_sin = (angles.cos(), angles.sin())
    with torch.no_grad():
        stock = type(attn).forward(attn, hidden, cu, position_embeddings=cos_sin)
        dense = attn.forward(hidden, cu, position_embeddings=cos_sin)
    tolerance = 1e-4 if param.dtype == torch.float32 else 5e-2
    error = float((dense.float() - stock.float()).abs().max())
    scale = max(1.0, float(stock.float().abs().max()))
    if not error <= tolerance * scale:
        raise _fail(f"the dense forward differs from the stock one by {error:.3g} on a test input")


def _runs(grid_thw: torch.Tensor) -> list[tuple[tuple[int, int, int], int]]:
    """Consecutive equal rows of ``grid_thw``: ``[((t, h, w), count), ...]``."""
    runs: list[tuple[tuple[int, int, int], int]] = []
    for row in map(tuple, grid_thw.tolist()):
        if runs and runs[-1][0] == row:
            runs[-1] = (row, runs[-1][1] + 1)
        else:
            runs.append((row, 1))
    return runs


def _tiled(tower: Any, grid_thw: torch.Tensor, position, window):
    """The tower's rotary positions and window index for ``grid_thw``, computed by the tower's
    own ``position(grid)`` and ``window(grid)`` once per run of equal grids (one image) and
    tiled with each image's offsets, instead of once per image: the same tensors.

    ``window(grid)`` returns ``(window_index, cu_window_seqlens)`` for one image; the whole
    batch's ``cu_window_seqlens`` is returned as a list of ints."""
    unit = tower.spatial_merge_unit
    positions, windows, cu = [], [], [0]
    patches = 0
    for row, count in _runs(grid_thw):
        one = torch.tensor([row], dtype=grid_thw.dtype, device=grid_thw.device)
        image_patches = row[0] * row[1] * row[2]
        positions.append(position(one).repeat(count, 1))
        index, seqlens = window(one)
        offsets = torch.arange(count, device=index.device)[:, None]
        windows.append((index[None] + (patches + offsets * image_patches) // unit).flatten())
        bounds = torch.as_tensor(seqlens, dtype=torch.long).cpu()[1:]
        cu.extend((bounds[None] + patches + image_patches * offsets.cpu()).flatten().tolist())
        patches += count * image_patches
    return torch.cat(positions), torch.cat(windows), cu


def _tile_positions(tower: Any) -> bool:
    """Makes ``tower`` compute its rotary positions and window index once per run of equal
    grids (see :func:`_tiled`); False if this transformers' tower is not one this knows."""
    if hasattr(type(tower), "rot_pos_emb") and hasattr(type(tower), "get_window_index"):  # 4.57
        stock_positions, stock_window = tower.rot_pos_emb, tower.get_window_index

        def rot_pos_emb(grid_thw):
            return _tiled(tower, grid_thw, stock_positions, stock_window)[0]

        def get_window_index(grid_thw):
            return _tiled(tower, grid_thw, stock_positions, stock_window)[1:]

        tower.rot_pos_emb, tower.get_window_index = rot_pos_emb, get_window_index
        return True
    modeling = sys.modules.get(type(tower).__module__)
    position = getattr(modeling, "get_vision_position_ids", None)
    window = getattr(modeling, "get_vision_window_index", None)
    params = tuple(inspect.signature(type(tower).forward).parameters)
    if not (callable(position) and callable(window)) or params != (
        "self",
        "hidden_states",
        "grid_thw",
        "kwargs",
    ):
        return False
    stock_forward = tower.forward
    size = tower.spatial_merge_size

    def forward(hidden_states, grid_thw, **kwargs):  # 5.x: passed as precomputed kwargs
        if not {"position_ids", "window_index", "cu_window_seqlens"} & set(kwargs):
            ids, index, cu = _tiled(
                tower,
                grid_thw,
                lambda one: position(one, size),
                lambda one: window(one, size, tower.window_size, tower.patch_size),
            )
            kwargs["position_ids"] = ids
            kwargs["window_index"] = index
            kwargs["cu_window_seqlens"] = torch.tensor(
                cu, dtype=torch.int32, device=grid_thw.device
            )
        return stock_forward(hidden_states, grid_thw, **kwargs)

    tower.forward = forward
    return True


def enable_dense_vision(model: Any) -> int:
    """Switches every vision block's attention of a loaded Qwen2.5-VL ``model`` to the dense
    forward, and its rotary positions and window index to be tiled per run of equal grids;
    returns how many attention modules were switched (the tower's depth, or 0 when the vision
    attention implementation is flash attention, already one varlen call, or another the dense
    path does not cover). Idempotent. Raises ValueError if the installed transformers' vision
    attention is not the shape this was written against."""
    modules = _attention_modules(model)
    checked = [_check(attn) for attn in modules]
    implementation = _implementation(modules[0])
    if implementation not in _DENSE_IMPLEMENTATIONS:
        if "flash" not in str(implementation):
            log.warning(
                "dense vision attention covers %s; the vision tower's %r stays stock",
                "/".join(_DENSE_IMPLEMENTATIONS),
                implementation,
            )
        return 0
    cache = _PlanCache()
    for attn, modeling in zip(modules, checked):
        if not getattr(attn, _MARK, False):
            attn.forward = types.MethodType(_make_forward(attn, modeling, cache), attn)
            setattr(attn, _MARK, True)
    try:
        _self_check(modules[0])
    except ValueError:
        disable_dense_vision(model)
        raise
    tower = vision_tower(model)
    if not getattr(tower, _MARK, False):
        setattr(tower, _MARK, _tile_positions(tower))
    return len(modules)


def disable_dense_vision(model: Any) -> int:
    """Restores the stock forward on every vision attention module; returns how many were dense
    (0 for a model of unknown shape: nothing was switched)."""
    try:
        tower = vision_tower(model)
    except ValueError:
        return 0
    if getattr(tower, _MARK, None) is not None:
        for name in _TOWER_OVERRIDES:
            if name in vars(tower):
                delattr(tower, name)
        delattr(tower, _MARK)
    restored = 0
    for attn in _attention_modules(model):
        if getattr(attn, _MARK, False):
            del attn.forward
            delattr(attn, _MARK)
            restored += 1
    return restored


def is_dense(model: Any) -> bool:
    """Whether any vision attention module of ``model`` runs the dense forward."""
    return any(getattr(attn, _MARK, False) for attn in _attention_modules(model))
