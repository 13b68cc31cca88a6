"""Size bucketing (bucketing.py): full buckets by size and token budget, flushes, padding."""

from __future__ import annotations

import pytest

from qvl_batch.engines.bucketing import Bucketer


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_bucketer_emits_full_buckets_by_size_and_token_budget():
    b = Bucketer(max_batch_size=3, max_tokens=1000, max_wait_s=5, clock=Clock())
    for i in range(5):
        b.add(("a", i), key=(28, 28), tokens=10, seq_len=10)
        b.add(("b", i), key=(56, 56), tokens=10, seq_len=20)
    first = b.next_batch()
    assert first == [("a", 0), ("a", 1), ("a", 2)]
    assert b.next_batch() == [("b", 0), ("b", 1), ("b", 2)]
    assert b.next_batch() is None, "partial buckets wait for max_wait_s"
    # token budget: 3 rows of 400 tokens do not fit in 1000
    t = Bucketer(max_batch_size=10, max_tokens=1000, max_wait_s=5, clock=Clock())
    for i in range(3):
        t.add(i, key="k", tokens=400, seq_len=400)
    assert t.next_batch() == [0, 1]
    assert t.stats.token_capped == 1, "the budget, not the batch size, ended it"
    assert b.stats.token_capped == 0, "full by rows"
    assert t.next_batch(force=True) == [2] and t.stats.token_capped == 1, "nothing more waited"


def test_token_capped_batches_are_counted_and_summed_over_actors():
    from qvl_batch.engines.bucketing import PaddingStats

    b = Bucketer(max_batch_size=4, max_tokens=100, max_wait_s=0, clock=Clock())
    for i in range(8):
        b.add(i, key="k", tokens=30, seq_len=30)  # 3 rows fill the budget
    for i in range(8, 16):
        b.add(i, key="small", tokens=10, seq_len=10)  # 4 rows fit
    batches = []
    while batch := b.next_batch(force=True):
        batches.append(batch)
    assert [len(x) for x in batches] == [3, 3, 4, 4, 2]  # full buckets first, then the rest
    assert b.stats.as_dict()["token_capped_batches"] == 2
    total = PaddingStats()
    total.merge(b.stats.as_dict())
    total.merge(b.stats.as_dict())
    assert total.token_capped == 4


def test_bucketer_flushes_oldest_after_wait_or_when_forced():
    clock = Clock()
    b = Bucketer(max_batch_size=8, max_tokens=10_000, max_wait_s=2, clock=clock)
    b.add("old", key="x", tokens=1, seq_len=1)
    clock.t = 1.0
    b.add("new", key="y", tokens=1, seq_len=1)
    assert b.next_batch() is None
    assert b.seconds_until_due() == pytest.approx(1.0)
    clock.t = 2.0
    assert b.next_batch() == ["old"]
    assert b.next_batch(force=True) == ["new"]
    assert b.pending == 0 and b.next_batch(force=True) is None


def test_bucketing_avoids_padding_that_arrival_order_would_have():
    b = Bucketer(max_batch_size=4, max_tokens=10**6, max_wait_s=0, clock=Clock())
    sizes = [100, 400] * 8  # alternating image sizes: arrival-order batches mix them
    for i, s in enumerate(sizes):
        b.add(i, key=s, tokens=s, seq_len=s)
    while b.next_batch(force=True):
        pass
    assert b.stats.rows == 16 and b.stats.padded_tokens == 0
    assert b.stats.fifo_padded_tokens == 4 * (2 * 300)  # each fifo batch pads two 100s to 400
    assert b.stats.fifo_padding_fraction > 0.3


def test_bucketer_tops_up_a_bucket_with_the_nearest_sizes_within_the_padding_limit():
    b = Bucketer(max_batch_size=8, max_tokens=10**6, max_wait_s=5, clock=Clock(), max_padding=0.1)
    for i in range(5):  # interleaved arrivals of three sizes
        b.add(("s", i), key=(28, 28), tokens=100, seq_len=100)
        b.add(("m", i), key=(56, 28), tokens=104, seq_len=104)
        b.add(("l", i), key=(56, 56), tokens=400, seq_len=400)
    # No bucket is full, but 100s topped up with 104s fill a batch (padding 20/832): now.
    assert b.next_batch() == [("s", i) for i in range(5)] + [("m", i) for i in range(3)]
    assert b.stats.padded_tokens == 8 * 104 - (5 * 100 + 3 * 104)
    # 400s would pad 104s by far more than 10%: nothing else fills, so nothing goes yet...
    assert b.next_batch() is None
    # ...until forced (or due): the oldest bucket alone, then the other.
    assert b.next_batch(force=True) == [("m", 3), ("m", 4)]
    assert b.next_batch(force=True) == [("l", i) for i in range(5)]
    assert b.pending == 0


def test_bucketer_merges_sizes_with_the_same_token_count_at_no_padding():
    """640x480 and 480x640 resize to different grids but the same number of tokens."""
    b = Bucketer(max_batch_size=4, max_tokens=10**6, max_wait_s=5, clock=Clock(), max_padding=0.1)
    for i in range(2):
        b.add(("land", i), key=(644, 476), tokens=423, seq_len=423)
        b.add(("port", i), key=(476, 644), tokens=423, seq_len=423)
    assert sorted(b.next_batch()) == [("land", 0), ("land", 1), ("port", 0), ("port", 1)]
    assert b.stats.padded_tokens == 0
    exact = Bucketer(max_batch_size=4, max_tokens=10**6, max_wait_s=5, clock=Clock())
    for i in range(2):
        exact.add(("land", i), key=(644, 476), tokens=423, seq_len=423)
        exact.add(("port", i), key=(476, 644), tokens=423, seq_len=423)
    assert exact.next_batch() is None, "max_padding=0 (the default) keeps sizes apart"
    assert exact.next_batch(force=True) == [("land", 0), ("land", 1)]


def test_bucketer_padding_stays_within_the_limit_over_random_sizes():
    import random

    rng = random.Random(7)
    sizes = [288, 423, 761, 788, 800, 300, 1056]
    b = Bucketer(max_batch_size=16, max_tokens=12_000, max_wait_s=5, clock=Clock(), max_padding=0.1)
    seq_len: dict[int, int] = {}
    batches: list[list[int]] = []
    for i in range(2000):
        seq_len[i] = n = rng.choice(sizes)
        b.add(i, key=n, tokens=n + 64, seq_len=n)
        if i % 7 == 0 and (batch := b.next_batch()):
            batches.append(batch)
    while batch := b.next_batch(force=True):
        batches.append(batch)
    assert sorted(i for batch in batches for i in batch) == list(range(2000)), "each row once"
    for batch in batches:
        lengths = [seq_len[i] for i in batch]
        assert len(batch) <= 16 and sum(n + 64 for n in lengths) <= 12_000
        assert len(lengths) * max(lengths) - sum(lengths) <= 0.1 * len(lengths) * max(lengths)
    assert 0 < b.stats.padding_fraction <= 0.1  # 761/788/800 do share batches
    assert b.stats.as_dict()["mean_batch_size"] > 12  # so batches stay nearly full
