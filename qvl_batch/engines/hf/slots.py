"""The in-flight hf engine's static slot cache (``engine.hf.inflight_cache: static``).

A KV cache of ``slots x length`` per layer, allocated once a length; each row keeps its slot from
its join to its end. A joining group is prefilled on its own (a ``DynamicCache``, as the dynamic
path does) and its left-padded rows are copied into free slots at columns ``0 .. width``: one
``index_copy_`` per layer and tensor. Each slot has its own write column (the next token's KV goes
there: an ``index_put_`` per layer at (slot, column) pairs, not ``StaticCache``'s one
``cache_position`` for all rows; inductor writes it in place, where a ``scatter_`` became a copy of
the whole cache every step: docs/INFLIGHT.md) and its own mask row (the columns it attends: its
prompt, less the padding, and its tokens so far). A row that ends frees its slot (its mask row
zeroed): nothing is copied. So a decode step takes tensors of fixed shapes, ``(slots, 1)`` tokens
over ``(slots, length)`` caches, every step of a length: one compile (one CUDA graph) a length.
Design: docs/INFLIGHT.md "Static slots".

The cache object is what the text model of transformers 4.57.3 and 5.x asks of one: ``update``
(4.57 passes ``cache_kwargs`` positionally, 5.x ``kwargs=``) and ``get_seq_length`` (read only
where positions or masks are not given; both are given here). The mask goes in prepared, as
``generate`` passes it (``{"full_attention": (slots, 1, 1, length) bool}``): the model builds
none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .decode import grid_length, kv_bytes_per_token, kv_dims
from .running import Row, RunningBatch

log = logging.getLogger(__name__)


class SlotCache:
    """Keys and values ``(slots, kv_heads, length, head_dim)`` per layer, each slot's write
    column and mask row. ``update`` writes each row's new KV at its own column and returns the
    whole cache (attention over every column, the mask says which count)."""

    def __init__(self, text_config: Any, slots: int, length: int, dtype: torch.dtype, device):
        layers, heads, dim = kv_dims(text_config)
        self.text, self.dtype = _Shape(layers, heads, dim), dtype  # to size or grow it by
        shape = (slots, heads, length, dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.mask = torch.zeros(slots, length, dtype=torch.bool, device=device)
        self.write = torch.zeros(slots, dtype=torch.long, device=device)  # the next KV's column
        self.slot_ids = torch.arange(slots, device=device)  # each slot's row, beside its column
        self.slots, self.length = slots, length

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a decode step reads or writes in place (a CUDA graph holds their
        addresses)."""
        return [*self.keys, *self.values, self.mask, self.write, self.slot_ids]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_, **__
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step's ``(slots, kv_heads, 1, head_dim)`` keys and values, each row's at
        its own column (an ``index_put_``: written in place, also when compiled)."""
        at = (self.slot_ids, slice(None), self.write)
        self.keys[layer_idx][at] = key_states[:, :, 0]
        self.values[layer_idx][at] = value_states[:, :, 0]
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Not a length here (each slot has its own): 0. transformers reads it only to derive
        positions or a mask, and both are passed in."""
        return 0


def decode_step(
    model: Any, cache: SlotCache, last: torch.Tensor, pos: torch.Tensor, cache_kwarg: str
) -> torch.Tensor:
    """One decode step over every slot: each feeds its last token at its position, its KV is
    written at its column, which it attends from now on; the next column is its write column
    (at most the last: a row that ended decodes on until it is read back, its tokens dropped).
    Returns the ``(slots, vocab)`` logits. Fixed shapes: the function ``torch.compile`` gets."""
    n = last.shape[0]
    cache.mask[cache.slot_ids, cache.write] = True
    out = model(
        input_ids=last[:, None],
        attention_mask={"full_attention": cache.mask[:, None, None, :]},
        position_ids=pos.view(1, n, 1).expand(3, n, 1),
        use_cache=True,
        **{cache_kwarg: cache},
    )
    cache.write.copy_((cache.write + 1).clamp(max=cache.length - 1))
    return out.logits[:, -1]


class SlotsFull(RuntimeError):
    """A group needs longer slots than the static caches' cap allows."""


def slots_fit(hf: Any) -> bool:
    """Whether static slots can hold ``hf``'s text model: full attention in every layer (the
    step's mask is full attention)."""
    text = hf.model.config.get_text_config(decoder=True)
    return all(t == "full_attention" for t in getattr(text, "layer_types", None) or ())


def job_slots(hf: Any, slots: int, tokens: int, penalty: bool, compiled: bool) -> SlotBatch:
    """The engine's slots (``hf``: the loaded :class:`HFEngine`), ``tokens`` long, taken within
    the static caches' cap (``engine.hf.static_cache_gib``): past it refused, saying what to
    lower. ``tokens`` 0: the grid's first length, grown to what the rows that come need (a row
    of a 448x448 image and a caption takes ~590 columns where the job's bound, 4096 prompt
    tokens, 1280 vision tokens and the answer, is ~5700: every step reads all of them), within
    the cap (rows that need more run by themselves). ``penalty``: keep each slot's tokens;
    ``compiled``: its step is compiled (on CUDA, static addresses)."""
    text = hf.model.config.get_text_config(decoder=True)
    if not slots_fit(hf):
        raise ValueError(
            "engine.hf.inflight_cache=static: the text model has sliding-window layers (not "
            "supported: the step's mask is full attention); set inflight_cache=dynamic"
        )
    cap = hf.caches.cap_bytes
    # a column is not a position (a left-padded row's last column can pass its last position):
    # the grid's length, not capped by the model's positions; 0: the grid's first
    length = grid_length(tokens)
    size = SlotBatch.bytes_of(text, slots, length, hf.dtype)
    if cap is not None and size > cap:
        raise ValueError(
            f"engine.hf.inflight_cache=static: {slots} slots x {length} tokens take "
            f"{size / 2**30:.2f} GiB, over the static caches' cap ({cap / 2**30:.2f} GiB, "
            "engine.hf.static_cache_gib); lower engine.hf.slots or engine.hf.inflight_tokens "
            "(0: the slots grow to the rows' length), or raise engine.hf.static_cache_gib"
        )
    log.info(
        "hf in flight: static slots, %d x %d tokens, %.2f GiB%s",
        slots,
        length,
        size / 2**30,
        "" if tokens else " (grown to the rows' length as they come)",
    )
    static = compiled and hf.device.type == "cuda"  # CUDA graphs hold its addresses
    return SlotBatch.allocate(text, slots, length, hf.dtype, hf.device, penalty, static)


@dataclass
class SlotBatch:
    """The running rows in their slots (None: a free slot); the per-slot next position and last
    token; with a repetition penalty each slot's tokens so far (``seen``, ``(slots, length)``,
    columns not yet written filled with a token of the row's own: a repeat changes nothing).
    Its interface is :class:`RunningBatch`'s where the engine uses both. Its tensors change
    in inference mode only (a step's outputs are inference tensors)."""

    cache: SlotCache
    rows: list[Row | None]
    pos: torch.Tensor  # (slots,) long: the position of the token fed next
    last: torch.Tensor  # (slots,) long: the token fed next
    seen: torch.Tensor | None = None
    pending: list[torch.Tensor] = field(default_factory=list)

    static: bool = False  # the cache's addresses are marked static (CUDA graphs)

    @classmethod
    @torch.inference_mode()  # as a step's outputs: a compiled step's guards see one kind
    def allocate(
        cls,
        text_config: Any,
        slots: int,
        length: int,
        dtype: torch.dtype,
        device: Any,
        penalty: bool,
        static: bool = False,
    ) -> SlotBatch:
        """Empty slots; ``penalty``: keep ``seen``; ``static``: mark the cache's tensors as
        static addresses (a CUDA graph replays over them without copies)."""
        cache = SlotCache(text_config, slots, length, dtype, device)
        if static:
            for tensor in cache.tensors():
                torch._dynamo.mark_static_address(tensor)
        zeros = torch.zeros(slots, dtype=torch.long, device=device)
        seen = torch.zeros(slots, length, dtype=torch.long, device=device) if penalty else None
        return cls(cache, [None] * slots, zeros, zeros.clone(), seen, static=static)

    @staticmethod
    def bytes_of(text_config: Any, slots: int, length: int, dtype: torch.dtype) -> int:
        return slots * length * kv_bytes_per_token(text_config, dtype)

    @property
    def empty(self) -> bool:
        return all(row is None for row in self.rows)

    @property
    def live(self) -> int:
        """Rows still decoding (as :attr:`RunningBatch.live`)."""
        return sum(row is not None and not row.done and row.chosen < row.end for row in self.rows)

    @property
    def dead(self) -> int:
        """Rows in slots that no longer decode (ended, or at their length)."""
        return sum(row is not None for row in self.rows) - self.live

    def forward(self, model: Any, cache_kwarg: str, step: Any = decode_step) -> torch.Tensor:
        """One decode step (``step``: :func:`decode_step` or its compiled self); the logits."""
        return step(model, self.cache, self.last, self.pos, cache_kwarg)

    @torch.inference_mode()
    def advance(self, tokens: torch.Tensor) -> None:
        """After a step: each slot's chosen token is fed next, one position on."""
        self.pos, self.last = self.pos + 1, tokens
        if self.seen is not None:  # at the column its KV goes to next step
            self.seen.scatter_(1, self.cache.write[:, None], tokens[:, None])

    @torch.inference_mode()
    def compact(self) -> None:
        """Free the slots of the rows whose results are out (their mask rows zeroed); nothing
        moves."""
        assert not self.pending, "read the pending tokens back first"
        done = [i for i, row in enumerate(self.rows) if row is not None and row.done]
        if not done:
            return
        for i in done:
            self.rows[i] = None
        index = torch.tensor(done, dtype=torch.long, device=self.cache.mask.device)
        self.cache.mask.index_fill_(0, index, False)
        self.cache.write.index_fill_(0, index, 0)

    @torch.inference_mode()
    def clear(self) -> None:
        """Every slot free (a failed step's rows go back to the queue)."""
        self.rows, self.pending = [None] * self.cache.slots, []
        self.cache.mask.zero_()
        self.cache.write.zero_()

    def fits(self, group: RunningBatch) -> bool:
        """Do the group's rows fit a slot: their prompt width and longest answer (a row's
        tokens after its end are written at the last column)."""
        width = group.mask.shape[1]
        return width + max(row.end for row in group.rows) - 1 <= self.cache.length

    @torch.inference_mode()
    def join(self, group: RunningBatch) -> None:
        """The group's rows into free slots: KV, mask and tokens so far copied at columns
        ``0 .. width``, the write column after them."""
        assert not self.pending and not group.pending, "read the pending tokens back first"
        free = [i for i, row in enumerate(self.rows) if row is None][: len(group.rows)]
        assert len(free) == len(group.rows), f"{len(group.rows)} rows, {len(free)} free slots"
        assert self.fits(group), "a group wider than the slots (SlotBatch.fits)"
        cache = self.cache
        width = group.mask.shape[1]
        index = torch.tensor(free, dtype=torch.long, device=cache.mask.device)
        for i, layer in enumerate(group.cache.layers):
            cache.keys[i][:, :, :width].index_copy_(0, index, layer.keys)
            cache.values[i][:, :, :width].index_copy_(0, index, layer.values)
        mask = torch.zeros(len(free), cache.length, dtype=torch.bool, device=index.device)
        mask[:, :width] = group.mask.bool()
        cache.mask.index_copy_(0, index, mask)
        cache.write.index_fill_(0, index, width)
        self.pos.index_copy_(0, index, group.pos)
        self.last.index_copy_(0, index, group.last)
        if self.seen is not None and group.seen is not None:
            # the group's tokens: the columns a compaction cut (padding of every kept row)
            # are left out of ``seen`` too, so its first answer token sits at ``width``
            seen = group.seen[:, group.seen.shape[1] - width - 1 :]
            row = seen[:, :1].expand(-1, cache.length).clone()
            row[:, : width + 1] = seen
            self.seen.index_copy_(0, index, row)
        for i, r in zip(free, group.rows):
            self.rows[i] = r

    def room_for(self, group: RunningBatch, cap_bytes: int | None, warn: bool) -> SlotBatch:
        """This batch if the group fits, else this batch grown to the grid length that holds it
        (a compiled step compiles again; ``warn``: a length the job set is short of it). Past
        ``cap_bytes`` it raises :class:`SlotsFull`: the group runs by itself, the running rows
        untouched."""
        if self.fits(group):
            return self
        need = group.mask.shape[1] + max(row.end for row in group.rows) - 1
        length = grid_length(need)
        cache = self.cache
        size = SlotBatch.bytes_of(cache.text, cache.slots, length, cache.dtype)
        if cap_bytes is not None and size > cap_bytes:
            raise SlotsFull(
                f"static slots: {need} tokens need {cache.slots} x {length} "
                f"({size / 2**30:.2f} GiB), over the caches' cap (engine.hf.static_cache_gib)"
            )
        log.log(
            logging.WARNING if warn else logging.INFO,
            "hf in flight: %d tokens do not fit the static slots (%d); they grow to %d",
            need,
            cache.length,
            length,
        )
        return self.grown(length)

    @torch.inference_mode()
    def grown(self, length: int) -> SlotBatch:
        """This batch in a longer cache (a new shape: a compiled step compiles again)."""
        cache = self.cache
        device, penalty = cache.mask.device, self.seen is not None
        bigger = SlotBatch.allocate(
            cache.text, cache.slots, length, cache.dtype, device, penalty, self.static
        )
        new = bigger.cache
        old = cache.length
        for mine, theirs in zip(new.keys + new.values, cache.keys + cache.values):
            mine[:, :, :old].copy_(theirs)
        new.mask[:, :old].copy_(cache.mask)
        new.write.copy_(cache.write)
        if self.seen is not None and bigger.seen is not None:
            bigger.seen[:, :old].copy_(self.seen)
            bigger.seen[:, old:] = self.seen[:, :1]
        bigger.rows, bigger.pending = list(self.rows), list(self.pending)
        bigger.pos.copy_(self.pos)
        bigger.last.copy_(self.last)
        return bigger


@dataclass
class _Shape:
    """The text config fields :class:`SlotCache` reads, for a cache made from another."""

    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
