"""The stream seam in-process: answer lengths, the in-flight simulator, the batching adapter,
the flight recorder's bookkeeping, and an actor keeping an in-flight engine full but bounded."""

from __future__ import annotations

import itertools
import statistics
import threading
import time

import pytest
from PIL import Image

from qvl_batch.config import ConfigError
from qvl_batch.engines.base import BatchEngine, Request, Result
from qvl_batch.engines.batching import BatchingAdapter
from qvl_batch.engines.build import make_engine
from qvl_batch.engines.fake import FakeEngine, FakeEngineConfig, InflightSimulator
from qvl_batch.engines.lengths import answer_length, parse_lengths
from qvl_batch.rows.manifest import plan_job
from qvl_batch.run.actor import UnitWorker
from qvl_batch.run.recorder import FlightRecorder
from qvl_batch.run.validate import load_job

from ..conftest import expected_for, input_rows, write_job

pytestmark = pytest.mark.timeout(120)


class Sink:
    """The actor's side of the seam: what the engine reports, in order."""

    def __init__(self) -> None:
        self.results = []
        self.entered: list[list] = []
        self.failed = None
        self.cond = threading.Condition()

    def entering(self, keys) -> None:
        self.entered.append(list(keys))

    def put(self, result) -> None:
        with self.cond:
            self.results.append(result)
            self.cond.notify_all()

    def fail(self, exc) -> None:
        self.failed = exc

    def alive(self) -> None:
        self.signs_of_life = getattr(self, "signs_of_life", 0) + 1

    def wait(self, n: int, timeout: float = 10.0) -> list:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.results) >= n, timeout), self.results
        return list(self.results)


def requests(n: int, size=(56, 56), prefix: str = "r") -> list[Request]:
    img = Image.new("RGB", size, (90, 90, 90))
    tokens = (size[0] // 28) * (size[1] // 28)
    return [
        Request(("u", i), f"{prefix}{i}", "Describe", None, img, f"s{i}", tokens, 30)
        for i in range(n)
    ]


def test_answer_lengths_follow_their_distribution():
    ids = [f"row-{i}" for i in range(4000)]
    assert {answer_length("fixed:64", i) for i in ids} == {64}
    uniform = [answer_length("uniform:20:300", i) for i in ids]
    assert min(uniform) >= 20 and max(uniform) <= 300 and abs(statistics.mean(uniform) - 160) < 8
    caption = [answer_length("lognormal:110:300", i) for i in ids]
    assert max(caption) == 300 and min(caption) >= 1
    assert 95 < statistics.mean(caption) < 115  # the cap trims the mean a little
    assert 80 < statistics.median(caption) < 105  # long-tailed: median under the mean
    assert caption == [answer_length("lognormal:110:300", i) for i in ids]  # deterministic
    for bad in ("gamma:1:2", "fixed", "uniform:9:3", "lognormal:x:3", "fixed:0"):
        with pytest.raises(ValueError):
            parse_lengths(bad)
    with pytest.raises(ConfigError, match=r"engine\.fake\.answer_lengths"):
        FakeEngineConfig(answer_lengths="fixed")


def test_inflight_simulator_fills_free_slots_at_once_and_finishes_short_answers_first():
    done: list[str] = []
    fake = FakeEngineConfig(mode="inflight", slots=3, step_s=0.003)
    sim = InflightSimulator(fake, done.append)
    for name, length in [("long", 30), ("a", 2), ("b", 2), ("c", 2), ("d", 2), ("e", 2)]:
        sim.add(name, length, 10)
    deadline = time.monotonic() + 5
    while len(done) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    sim.close()
    assert done[-1] == "long" and sorted(done[:5]) == ["a", "b", "c", "d", "e"]
    assert sim.peak_active == 3 and sim.peak_in_flight == 6
    # The short answers took the other two slots in turns while the long one ran (a lock-step
    # engine would have held them until it ended): 30 steps, 30 + 5 x 2 slot-steps.
    stages = sim.stage_times()
    assert stages["slot"] / stages["busy"] == pytest.approx(40 / 30)


def test_batching_adapter_runs_a_part_batch_only_when_flushed_or_due(tmp_path, dataset):
    cfg = load_job(
        write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None),
        ["batching.max_batch_size=4", "batching.max_wait_s=30"],
    )
    adapter = BatchingAdapter(FakeEngine(cfg), cfg)
    assert adapter.max_in_flight == cfg.batching.window_batches * 4
    sink = Sink()
    adapter.start(sink)
    adapter.submit(requests(3))
    time.sleep(0.3)
    assert sink.results == [] and sink.entered == []  # a part-batch waits for more rows
    adapter.flush()  # nothing more is coming: run it
    assert len(sink.wait(3)) == 3 and sink.entered == [[("u", 0), ("u", 1), ("u", 2)]]
    more = [
        Request(("v", i), f"v{i}", "Describe", None, r.image, "x", 4, 30)
        for i, r in enumerate(requests(4))
    ]
    adapter.submit(more)  # a full batch goes without a flush
    assert len(sink.wait(7)) == 7 and sink.entered[-1] == [r.key for r in more]
    assert adapter.padding()["batches"] == 2
    adapter.close()


def test_batching_adapter_splits_a_failing_batch_down_to_its_poison_row(tmp_path, dataset):
    cfg = load_job(
        write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None),
        ["batching.max_batch_size=4", "engine.fake.raise_ids=[r2]"],
    )
    adapter = BatchingAdapter(FakeEngine(cfg), cfg)
    sink = Sink()
    adapter.start(sink)
    adapter.submit(requests(4))
    results = {r.key: r for r in sink.wait(4)}
    assert results[("u", 2)].error_code == "ENGINE_ERROR"
    assert all(results[("u", i)].error_code is None for i in (0, 1, 3))
    # The whole batch, then halves, then the poison row alone (tried twice).
    assert sink.entered[0] == [("u", i) for i in range(4)]
    assert sink.entered.count([("u", 2)]) == 2 and sink.failed is None
    adapter.close()


def test_batching_adapter_says_once_when_the_token_budget_cuts_batches(tmp_path, dataset, caplog):
    """Rows of 4 vision + 30 text + 64 new tokens: a budget of 200 holds 2 of the 4 rows a
    batch may have; the report counts the batches it cut, a warning says it once."""
    cfg = load_job(
        write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None),
        [
            "batching.max_batch_size=4",
            "batching.max_tokens_per_batch=200",
            "sampling.max_tokens=64",
        ],
    )
    adapter = BatchingAdapter(FakeEngine(cfg), cfg)
    sink = Sink()
    with caplog.at_level("WARNING", logger="qvl_batch.engines.batching"):
        adapter.start(sink)
        adapter.submit(requests(6))
        sink.wait(4)
        adapter.flush()
        sink.wait(6)
    assert [len(keys) for keys in sink.entered] == [2, 2, 2]
    assert adapter.padding()["token_capped_batches"] == 2, "the last ran on a flush"
    assert caplog.text.count("batching.max_tokens_per_batch=200 ended a batch at 2 rows") == 1
    assert "up to 98 here" in caplog.text
    adapter.close()


class Paced(BatchEngine):
    """Batches of 0.3 s that note when each batch was prepared, started and ended."""

    def __init__(self, fail_prepare: str = "") -> None:
        self.events: list[tuple[str, str]] = []
        self.given: dict[str, object] = {}
        self.fail_prepare = fail_prepare

    def prepare(self, requests):
        first = requests[0].row_id
        self.events.append(("prepare", first))
        if first == self.fail_prepare:
            raise ValueError("cannot prepare")
        return ("host", first)

    def generate(self, requests, prepared=None):
        first = requests[0].row_id
        self.given[first] = prepared
        self.events.append(("start", first))
        time.sleep(0.3)
        self.events.append(("end", first))
        return [Result(r.key, text=r.row_id, output_tokens=1) for r in requests]


def test_batching_adapter_prepares_the_next_batch_while_one_runs(tmp_path, dataset):
    cfg = load_job(
        write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None),
        ["batching.max_batch_size=4", "batching.window_batches=4"],
    )
    engine = Paced(fail_prepare="r8")
    adapter = BatchingAdapter(engine, cfg)
    sink = Sink()
    adapter.start(sink)
    adapter.submit(requests(16))
    assert {r.text for r in sink.wait(16)} == {f"r{i}" for i in range(16)}
    ev = engine.events
    firsts = ["r0", "r4", "r8", "r12"]
    assert [first for kind, first in ev if kind == "start"] == firsts
    for before, after in itertools.pairwise(firsts):
        # the next batch's host work happened while this one ran, not after it
        assert (
            ev.index(("start", before)) < ev.index(("prepare", after)) < ev.index(("end", before))
        )
    assert [kind for kind, _ in ev].count("prepare") == 4  # each batch once, one ahead at most
    assert engine.given == {
        "r0": ("host", "r0"),
        "r4": ("host", "r4"),
        "r8": None,
        "r12": ("host", "r12"),
    }  # a failed prepare: generate does it
    assert sink.failed is None
    adapter.close()


def test_batching_adapter_gives_back_no_unit_of_the_batch_prepared_next(tmp_path, dataset):
    cfg = load_job(
        write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None),
        ["batching.max_batch_size=2", "batching.window_batches=4", "batching.max_wait_s=30"],
    )
    adapter = BatchingAdapter(Paced(), cfg)
    sink = Sink()
    adapter.start(sink)
    img = requests(1)[0].image
    rows = [
        Request((unit, i), f"{unit}{i}", "D", None, img, "x", 4, 30)
        for unit in ("a", "b", "c")
        for i in range(2)
    ]
    adapter.submit(rows)
    deadline = time.monotonic() + 5
    while [k for k, _ in adapter.inner.events].count("prepare") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert adapter.take_back("a") is None  # running
    assert adapter.take_back("b") is None  # prepared next: its rows left the buckets
    assert adapter.take_back("c") == 2  # still waiting: comes back
    assert {r.text for r in sink.wait(4)} == {"a0", "a1", "b0", "b1"}
    adapter.close()


def test_flight_recorder_holds_rows_between_entering_and_leaving():
    rec = FlightRecorder()
    rec.note(0, [("a", 1), ("a", 2)], [])
    rec.note(0, [("a", 3)], [("a", 1)])  # one entering group carries what left since
    rec.note(1, [("b", 1)], [])
    assert rec.last(0) == ([("a", 2), ("a", 3)], False)
    assert rec.last(0) == (None, False)  # read once
    rec.note(1, [], [("b", 1)])  # everything back: nothing inside
    assert rec.last(1) == (None, False)


def test_flight_recorder_keeps_stalls_and_heartbeats_per_incarnation():
    rec = FlightRecorder()
    rec.note(2, [("a", 1)], [])
    rec.beat(2, 1, 40, 3.5)
    rec.beat(3, 0, 7, 0.0)
    beats = rec.health([2, 3, 4])
    assert set(beats) == {2, 3} and (beats[2].inside, beats[2].running_rows) == (1, 40)
    assert beats[2].quiet_s == 3.5 and 0 <= beats[2].age_s < 5
    rec.stalled(2)
    assert rec.last(2) == ([("a", 1)], True)  # judged as a stall, then forgotten
    assert rec.last(2) == (None, False) and set(rec.health([2, 3])) == {3}


def test_actor_keeps_an_inflight_engine_full_but_never_above_its_bound(tmp_path, dataset):
    cfg = load_job(
        write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None),
        [
            "engine.fake.mode=inflight",
            "engine.fake.slots=4",
            "engine.fake.step_s=0.002",
            "engine.fake.answer_lengths=uniform:1:12",
            "batching.max_batch_size=4",
        ],
    )
    worker = UnitWorker(cfg)
    assert worker.engine.max_in_flight == 8  # twice the slots
    units = list(plan_job(cfg).units())
    inputs = {r["id"]: r for r in input_rows(dataset)}
    tables = {}
    threads = [
        threading.Thread(target=lambda u=u: tables.__setitem__(u.unit_id, worker.process_unit(u)))
        for u in units[:3]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    sim = worker.engine.sim
    worker.close()
    assert 4 < sim.peak_in_flight <= 8  # rows waited for slots; the bound held
    assert sim.peak_active == 4
    for unit in units[:3]:
        rows = tables[unit.unit_id].to_pylist()
        assert [r["source_row"] for r in rows] == list(
            range(unit.row_start, unit.row_start + unit.num_rows)
        )
        for r in rows:
            if r["ok"]:
                assert r["text"] == expected_for(inputs[r["id"]]["image"], cfg.prompt.template)[0]
                assert 1 <= r["output_tokens"] <= 12  # the simulated answer length


def test_fake_inflight_engine_is_chosen_by_mode_and_feed(tmp_path, dataset):
    job = write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None)
    stream = make_engine(load_job(job, ["engine.fake.mode=inflight"]))
    batch = make_engine(load_job(job, ["engine.fake.mode=inflight", "engine.fake.feed=batch"]))
    lockstep = make_engine(load_job(job))
    assert type(stream).__name__ == "FakeInflightEngine" and stream.max_in_flight == 128
    assert (
        isinstance(batch, BatchingAdapter)
        and type(batch.inner).__name__ == "FakeInflightBatchEngine"
    )
    assert isinstance(lockstep, BatchingAdapter) and isinstance(lockstep.inner, FakeEngine)
    for engine in (stream, batch, lockstep):
        engine.close()
