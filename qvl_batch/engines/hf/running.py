"""The running batch of the in-flight hf engine (``inflight.py``): its rows, one transformers
``DynamicCache`` with the rows left-padded to a common width, their attention mask, next
positions and tokens. Rows join (both caches left-padded to the wider, concatenated: TGI-style)
and leave (a row that ends is a dead slot until ``compact``: an ``index_select`` of the rows
kept, the columns no kept row attends cut off the left).
The cache is edited through ``cache.layers[i].keys / .values`` (transformers 4.57.3 and 5.x).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..base import Request


@dataclass
class Row:
    """One request inside the engine, from its prefill to its result."""

    req: Request
    length: int = 0  # prompt and vision tokens, counted at submit: a join groups near lengths
    prompt_tokens: int = 0
    vision_tokens: int = 0
    end: int = 1  # new tokens at most: max_tokens, the model's positions, its drawn length
    ruled: bool = False  # ``end`` is the drawn benchmark length: ending there is "stop"
    tokens: list[int] = field(default_factory=list)  # read back from the device
    chosen: int = 0  # tokens chosen for it so far: ``tokens`` and those not yet read back
    tries: int = 0  # failures while running alone (a failure in company splits the company)
    # Put back from a decode step of several rows that failed: it runs only with rows of its
    # cohort, at most ``cap`` of them, so a row that poisons decode is cornered by halves.
    cohort: int = 0
    cap: int = 0
    matcher: Any = None  # guided decoding: the row's own grammar state (xgrammar)
    done: bool = False  # ended (its result is out); its slot is dead until the batch compacts


@dataclass
class RunningBatch:
    """Rows decoding together: their cache (rows x width), mask, next position, last token."""

    rows: list[Row]
    cache: Any
    mask: torch.Tensor  # (rows, width) long, 1 where a row attends
    pos: torch.Tensor  # (rows,) long: the position of the token fed next
    last: torch.Tensor  # (rows,) long: the token fed next
    # sampling.repetition_penalty: each row's tokens so far (prompt and answer), left-filled
    # with a token of its own (a repeat changes nothing); None without a penalty
    seen: torch.Tensor | None = None
    # the tokens chosen by the steps since the last read-back, one (rows,) tensor a step, still
    # on the device: rows join and leave only once they are read back
    pending: list[torch.Tensor] = field(default_factory=list)

    @property
    def live(self) -> int:
        """Rows still decoding: not ended, short of their length (one that reached it is a
        free slot before its tokens are read back; an EOS is seen only then)."""
        return sum(not row.done and row.chosen < row.end for row in self.rows)

    @property
    def empty(self) -> bool:
        return not self.rows

    @property
    def dead(self) -> int:
        """Rows in the batch that no longer decode (ended, or at their length)."""
        return len(self.rows) - self.live

    def compact(self) -> None:
        """Drop the rows whose results are out (dead slots)."""
        if any(row.done for row in self.rows):
            self.select([i for i, row in enumerate(self.rows) if not row.done])

    def select(self, keep: list[int]) -> None:
        """Keep these rows (indices); cut the columns no row kept attends off the left."""
        assert not self.pending, "read the pending tokens back first"
        self.rows = [self.rows[i] for i in keep]
        if not keep:  # the batch is done: its cache goes with it
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(0).long().argmax())
        self.mask, self.pos, self.last = mask[:, start:], self.pos[index], self.last[index]
        if self.seen is not None:
            self.seen = self.seen.index_select(0, index)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., start:, :]
            layer.values = layer.values.index_select(0, index)[..., start:, :]

    def join(self, other: RunningBatch) -> None:
        """Append ``other``'s rows: both left-padded to the wider cache, then concatenated."""
        assert not self.pending and not other.pending, "read the pending tokens back first"
        width = max(self.mask.shape[1], other.mask.shape[1])
        pad = torch.nn.functional.pad
        self.mask = torch.cat([pad(b.mask, (width - b.mask.shape[1], 0)) for b in (self, other)])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)
                both = [pad(t, (0, 0, width - t.shape[-2], 0)) for t in (a, b)]
                setattr(mine, name, torch.cat(both))
        self.rows += other.rows
        self.pos = torch.cat([self.pos, other.pos])
        self.last = torch.cat([self.last, other.last])
        if self.seen is not None and other.seen is not None:
            width = max(self.seen.shape[1], other.seen.shape[1])
            self.seen = torch.cat([_left_fill(t, width) for t in (self.seen, other.seen)])


def _left_fill(seen: torch.Tensor, width: int) -> torch.Tensor:
    """``seen`` widened to ``width`` on the left with each row's first token."""
    fill = seen[:, :1].expand(-1, width - seen.shape[1])
    return torch.cat([fill, seen], dim=1)
