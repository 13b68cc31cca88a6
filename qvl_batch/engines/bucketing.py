"""Size bucketing: batch rows whose images resize to the same grid, under size and token caps.

Rows with the same resized size have the same number of vision tokens, so a batch of them has
(almost) no padding. A bucket is emitted when it is full (``max_batch_size`` rows or
``max_tokens`` tokens). A bucket that is not full is topped up with rows of the buckets closest
in sequence length for as long as the batch's padding stays within ``max_padding`` (a fraction
of its padded tokens): a batch that fills this way is emitted at once, as a full bucket is, and
a partial one once its oldest row has waited ``max_wait_s`` or when the caller says nothing more
is coming soon (``force``), so no row waits forever. Small buckets (rare sizes, portrait and
landscape twins with the same token count, sizes a few tokens apart) thus ride in full batches
instead of running as small ones; ``max_padding=0`` keeps exact-size batches only.

The bucketer also keeps the padding it avoids: for the same rows in arrival order, cut into
batches of the same cap, it counts what padding would have been.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any


def budget_tokens(seq_len: int, max_tokens: int) -> int:
    """What a row counts against ``batching.max_tokens_per_batch``: its prompt and vision
    tokens and the answer its cache may grow by."""
    return seq_len + max_tokens


@dataclass
class PaddingStats:
    """Token counts of emitted batches vs. the same rows batched in arrival order."""

    batches: int = 0
    rows: int = 0
    tokens: int = 0  # real tokens (sum of row sequence lengths)
    padded_tokens: int = 0  # pad tokens in emitted batches
    fifo_padded_tokens: int = 0  # pad tokens had the rows been batched in arrival order
    batch_size_counts: dict[int, int] = field(default_factory=dict)  # size -> batches
    # batches the token budget ended short of max_batch_size rows while more rows waited
    token_capped: int = 0

    @property
    def padding_fraction(self) -> float:
        total = self.tokens + self.padded_tokens
        return self.padded_tokens / total if total else 0.0

    @property
    def fifo_padding_fraction(self) -> float:
        total = self.tokens + self.fifo_padded_tokens
        return self.fifo_padded_tokens / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "rows": self.rows,
            "tokens": self.tokens,
            "padded_tokens": self.padded_tokens,
            "padding_fraction": round(self.padding_fraction, 4),
            "fifo_padded_tokens": self.fifo_padded_tokens,
            "fifo_padding_fraction": round(self.fifo_padding_fraction, 4),
            "mean_batch_size": round(self.rows / self.batches, 2) if self.batches else 0.0,
            "batch_size_counts": dict(sorted(self.batch_size_counts.items())),
            "token_capped_batches": self.token_capped,
        }

    def merge(self, other: dict[str, Any]) -> None:
        """Add another actor's ``as_dict()`` into this one (the driver sums actors)."""
        self.batches += other["batches"]
        self.rows += other["rows"]
        self.tokens += other["tokens"]
        self.padded_tokens += other["padded_tokens"]
        self.fifo_padded_tokens += other["fifo_padded_tokens"]
        self.token_capped += other.get("token_capped_batches", 0)
        for size, n in other["batch_size_counts"].items():
            self.batch_size_counts[int(size)] = self.batch_size_counts.get(int(size), 0) + n


@dataclass
class _Plan:
    """A batch: (bucket, rows to take) in order, and what ended it."""

    takes: list[tuple[Hashable, int]] = field(default_factory=list)
    filled: bool = False  # a cap (rows or tokens) ended it
    token_capped: bool = False  # the token budget did, short of max_batch_size rows


def _pad(lengths: list[int]) -> int:
    return len(lengths) * max(lengths) - sum(lengths) if lengths else 0


class Bucketer:
    """Not thread-safe: the owner serialises calls (the actor holds a lock around it)."""

    def __init__(
        self,
        max_batch_size: int,
        max_tokens: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_padding: float = 0.0,
    ):
        self.max_batch_size = max_batch_size
        self.max_tokens = max_tokens
        self.max_wait_s = max_wait_s
        self.max_padding = max_padding
        self.clock = clock
        # key -> deque of (item, tokens, seq_len, arrival time); rows of a bucket in arrival
        # order (the buckets themselves are not: a drained bucket's key comes back at the end)
        self._buckets: OrderedDict[Hashable, deque] = OrderedDict()
        self._bucket_tokens: dict[Hashable, int] = {}
        self._tokens = 0  # over every bucket
        self._fifo: list[int] = []  # arrival-order sequence lengths for the counterfactual
        self.stats = PaddingStats()
        self.pending = 0

    def add(self, item: Any, key: Hashable, tokens: int, seq_len: int) -> None:
        """Queue one row; ``tokens`` counts against the batch budget, ``seq_len`` for padding."""
        if key not in self._buckets:
            self._buckets[key] = deque()
            self._bucket_tokens[key] = 0
        self._buckets[key].append((item, tokens, seq_len, self.clock()))
        self._bucket_tokens[key] += tokens
        self._tokens += tokens
        self.pending += 1
        self._fifo.append(seq_len)
        if len(self._fifo) == self.max_batch_size:
            self.stats.fifo_padded_tokens += _pad(self._fifo)
            self._fifo = []

    def _full(self, key: Hashable) -> bool:
        return (
            len(self._buckets[key]) >= self.max_batch_size
            or self._bucket_tokens[key] >= self.max_tokens
        )

    def next_batch(self, force: bool = False) -> list[Any] | None:
        """The next batch to run, or None if every bucket should keep waiting."""
        if not self._buckets:
            if force and self._fifo:
                self.stats.fifo_padded_tokens += _pad(self._fifo)
                self._fifo = []
            return None
        full = next((k for k in self._buckets if self._full(k)), None)
        if full is not None:
            return self._take(self._plan(full, merge=False))
        # The bucket whose head row arrived first:
        oldest = min(self._buckets, key=lambda k: self._buckets[k][0][3])
        due = force or self.clock() - self._buckets[oldest][0][3] >= self.max_wait_s
        if not due and self.pending < self.max_batch_size and self._tokens < self.max_tokens:
            return None  # nothing can fill a batch yet
        plan = self._plan(oldest, merge=self.max_padding > 0)
        return self._take(plan) if plan.filled or due else None

    def _plan(self, seed: Hashable, merge: bool) -> _Plan:
        """The (bucket, rows to take) of a batch started from bucket ``seed``: its rows in
        arrival order, then (``merge``) rows of the buckets closest in sequence length while the
        batch's padding stays within ``max_padding``; whether a cap ended it, and which."""
        plan = _Plan()
        rows = budget = total = longest = 0
        keys = [seed]
        if merge:
            head = self._buckets[seed][0][2]
            near = sorted(self._buckets, key=lambda k: abs(self._buckets[k][0][2] - head))
            keys += [k for k in near if k != seed]
        for key in keys:
            taken = 0
            for _, tokens, seq_len, _ in self._buckets[key]:
                if rows >= self.max_batch_size or (rows and budget + tokens > self.max_tokens):
                    plan.takes.append((key, taken))
                    plan.filled, plan.token_capped = True, rows < self.max_batch_size
                    return plan
                top = max(longest, seq_len)
                padding = (rows + 1) * top - (total + seq_len)
                if key != seed and padding > self.max_padding * (rows + 1) * top:
                    break  # this bucket's rows would pad the batch too much
                rows, budget, total, longest = rows + 1, budget + tokens, total + seq_len, top
                taken += 1
            plan.takes.append((key, taken))
        plan.filled = rows >= self.max_batch_size
        return plan

    def _take(self, plan: _Plan) -> list[Any]:
        items, lengths = [], []
        for key, n in plan.takes:
            if not n:
                continue
            queue = self._buckets[key]
            for _ in range(n):
                item, tokens, seq_len, _ = queue.popleft()
                items.append(item)
                lengths.append(seq_len)
                self._bucket_tokens[key] -= tokens
                self._tokens -= tokens
            if not queue:
                del self._buckets[key]
                del self._bucket_tokens[key]
        self.pending -= len(items)
        self.stats.batches += 1
        self.stats.token_capped += plan.token_capped
        self.stats.rows += len(items)
        self.stats.tokens += sum(lengths)
        self.stats.padded_tokens += _pad(lengths)
        counts = self.stats.batch_size_counts
        counts[len(items)] = counts.get(len(items), 0) + 1
        if self.pending == 0 and self._fifo:
            self.stats.fifo_padded_tokens += _pad(self._fifo)
            self._fifo = []
        return items

    def remove(self, match: Callable[[Any], bool]) -> list[Any]:
        """Take the queued rows ``match`` picks back out (a unit moved to another actor)."""
        removed = []
        for key in list(self._buckets):
            queue, kept = self._buckets[key], deque()
            for entry in queue:
                if match(entry[0]):
                    removed.append(entry[0])
                    self._bucket_tokens[key] -= entry[1]
                    self._tokens -= entry[1]
                else:
                    kept.append(entry)
            if kept:
                self._buckets[key] = kept
            else:
                del self._buckets[key]
                del self._bucket_tokens[key]
        self.pending -= len(removed)
        return removed

    def seconds_until_due(self) -> float | None:
        """How long until the oldest partial bucket is due, for the consumer's wait timeout."""
        if not self._buckets:
            return None
        oldest = min(q[0][3] for q in self._buckets.values())
        return max(0.0, oldest + self.max_wait_s - self.clock())
