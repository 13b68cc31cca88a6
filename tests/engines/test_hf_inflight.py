"""The hf engine in flight (``engine.hf.schedule: inflight``, issue #27) on CPU with the tiny
random Qwen2.5-VL: greedy float32 answers equal the lock-step engine's token for token, with
rows of mixed image sizes and answer lengths entering mid-decode; a short answer leaves (and
reaches the sink) before a long one ends; a poison row fails alone. Most tests run with both
running caches (``engine.hf.inflight_cache``): the DynamicCache and the static slots."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qvl_batch.config import (  # noqa: E402
    BatchingConfig,
    BenchmarkKnobs,
    Config,
    EngineConfig,
    SamplingConfig,
    StructuredConfig,
)
from qvl_batch.engines.base import Engine, Result  # noqa: E402
from qvl_batch.engines.bucketing import budget_tokens  # noqa: E402
from qvl_batch.engines.build import make_batch_engine, make_engine  # noqa: E402
from qvl_batch.engines.hf.decode import kv_bytes_per_token  # noqa: E402
from qvl_batch.engines.hf.inflight import HFInflightEngine  # noqa: E402
from qvl_batch.engines.hf.settings import HFEngineConfig  # noqa: E402
from qvl_batch.engines.hf.slots import job_slots, slots_fit  # noqa: E402
from qvl_batch.engines.lengths import answer_length  # noqa: E402
from qvl_batch.errors import ConfigError, RowError  # noqa: E402

from ..engine_inputs import engine_requests  # noqa: E402

pytest_plugins = ["tests.models"]  # the session-scoped tiny_model fixture
pytestmark = pytest.mark.timeout(300)

LENGTHS = "uniform:2:14"  # mixed answer lengths, from each row's id
CACHES = ["dynamic", "static"]  # engine.hf.inflight_cache


def _config(
    model: str,
    schedule: str,
    slots: int = 0,
    max_tokens: int = 16,
    lengths=LENGTHS,
    hf=None,
    **cfg,
) -> Config:
    return Config(
        engine=EngineConfig(
            name="hf",
            model=model,
            device="cpu",
            hf=HFEngineConfig(schedule=schedule, slots=slots, **(hf or {})),
            benchmark=BenchmarkKnobs(lengths),
        ),
        sampling=cfg.pop("sampling", None) or SamplingConfig(max_tokens=max_tokens),
        batching=BatchingConfig(max_batch_size=16),
        **cfg,
    )


class Sink:
    """Records what the engine reports: results in arrival order, with the decode step each
    came at, and the rows running when each group entered."""

    def __init__(self, engine: HFInflightEngine):
        self.engine = engine
        self.results: list[tuple[Result, int]] = []
        self.entered: list[tuple[int, int]] = []  # (rows entering, rows running then)
        self.groups: list[list] = []  # the keys of each group entering
        self.steps_at_entry: list[int] = []  # decode steps taken when each group entered
        self.done = threading.Event()
        self.want = 0
        self.error: BaseException | None = None

    def entering(self, keys) -> None:
        running = self.engine._running
        self.entered.append((len(keys), running.live if running else 0))
        self.groups.append(list(keys))
        self.steps_at_entry.append(self.engine.steps)

    def put(self, result: Result) -> None:
        self.results.append((result, self.engine.steps))
        if len(self.results) >= self.want:
            self.done.set()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.done.set()

    def alive(self) -> None:
        pass


def _run_inflight(engine: Engine, requests, parts: int = 1) -> Sink:
    assert isinstance(engine, HFInflightEngine)
    sink = Sink(engine)
    sink.want = len(requests)
    engine.start(sink)
    step = -(-len(requests) // parts)
    for i in range(0, len(requests), step):  # the actor hands rows over as it prepares them
        engine.submit(requests[i : i + step])
        time.sleep(0.05)
    assert sink.done.wait(60), f"{len(sink.results)} of {len(requests)} results"
    assert sink.error is None
    return sink


def _slot_tensors(engine: HFInflightEngine) -> list[int]:
    """The addresses of the static slots' tensors (none with the dynamic cache)."""
    batch = engine._slot_batch
    return [t.data_ptr() for t in batch.cache.tensors()] if batch is not None else []


def _fields(r: Result) -> tuple:
    return (r.text, r.output_tokens, r.finish_reason, r.prompt_tokens, r.vision_tokens)


@pytest.fixture(scope="module")
def lockstep_answers(tiny_model):
    """The lock-step engine's answers to 10 rows, one padded batch: the reference."""
    requests = engine_requests(10)
    engine = make_batch_engine(_config(tiny_model, "lockstep"))
    try:
        results = engine.generate(requests)
    finally:
        engine.close()
    return requests, {r.key: r for r in results}


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("slots, attention", [(3, "stock"), (16, "stock"), (3, "grouped")], ids=str)
def test_inflight_answers_equal_lockstep_token_for_token(
    tiny_model, lockstep_answers, slots, attention, cache
):
    """Greedy fp32: each row's answer is the lock-step engine's, whether its rows decode all
    together (16 slots) or enter as others leave (3 slots: rows join a running batch); with
    the grouped decode attention (gqa.py) too. The static slots, once they hold the rows,
    stay: rows join and leave without a copy of the cache."""
    requests, want = lockstep_answers
    assert len({answer_length(LENGTHS, r.row_id) for r in requests}) > 4
    assert len({r.image.size for r in requests}) == 3
    hf = {"decode_attention": attention, "inflight_cache": cache}
    engine = make_engine(_config(tiny_model, "inflight", slots=slots, hf=hf))
    try:
        assert engine.modes()["decode_attention"] == attention
        assert engine.modes()["inflight_cache"] == cache
        if slots == 3:  # the warm-up leaves nothing behind that changes an answer
            engine.warmup()  # (its 448x448 rows grow the slots: sized by the rows)
            assert engine.steps == 0 and engine._running is None
        held = _slot_tensors(engine)
        sink = _run_inflight(engine, requests, parts=2)
        assert engine.peak_active <= slots
        assert _slot_tensors(engine) == held  # the same memory from start to end
    finally:
        engine.close()
    got = {r.key: r for r, _ in sink.results}
    assert sorted(got) == sorted(want)
    for key, ref in want.items():
        assert ref.error_code is None and got[key].error_code is None, got[key].error_message
        assert _fields(got[key]) == _fields(ref), key
    assert sum(ref.finish_reason == "stop" for ref in want.values()) == len(want)
    if slots < len(requests):  # some group was prefilled while other rows were decoding
        assert any(running for _, running in sink.entered), sink.entered


@pytest.mark.parametrize("cache", CACHES)
def test_answers_that_end_on_eos_between_reads_equal_lockstep(tiny_model, cache):
    """No benchmark lengths: the random model's own EOS ends most answers, at lengths that are
    not multiples of READ_EVERY, so an EOS is seen steps after it is chosen; the tokens chosen
    after it are dropped and each answer is the lock-step engine's token for token."""
    from qvl_batch.engines.hf.inflight import READ_EVERY

    requests = engine_requests(12)
    lockstep = make_batch_engine(_config(tiny_model, "lockstep", max_tokens=40, lengths=""))
    try:
        want = {r.key: r for r in lockstep.generate(requests)}
    finally:
        lockstep.close()
    stops = [r.output_tokens for r in want.values() if r.finish_reason == "stop"]
    assert len([n for n in stops if n % READ_EVERY]) >= 4, stops  # EOS between reads
    assert any(r.finish_reason == "length" for r in want.values())
    hf = {"inflight_cache": cache}
    engine = make_engine(_config(tiny_model, "inflight", slots=4, max_tokens=40, lengths="", hf=hf))
    try:
        sink = _run_inflight(engine, requests, parts=2)
        steps, reads = engine.steps, engine.reads
    finally:
        engine.close()
    got = {r.key: r for r, _ in sink.results}
    for key, ref in want.items():
        assert _fields(got[key]) == _fields(ref), key
    assert reads < steps / 2, (reads, steps)  # the device is not waited for at every step


@pytest.mark.parametrize("cache", CACHES)
def test_a_short_answer_arrives_before_a_long_one_ends(tiny_model, cache):
    requests = engine_requests(6)
    lengths = {r.key: answer_length(LENGTHS, r.row_id) for r in requests}
    engine = make_engine(_config(tiny_model, "inflight", slots=6, hf={"inflight_cache": cache}))
    try:
        sink = _run_inflight(engine, requests)
        times = engine.stage_times()
    finally:
        engine.close()
    # the clocks the bench reads (as the fake in-flight engine's): slot-seconds over busy
    assert 0 < times["vision"] < times["prefill"] and times["decode"] > 0
    assert 1 <= times["slot"] / times["busy"] <= 6
    arrived = [r.key for r, _ in sink.results]
    assert arrived != [r.key for r in requests]  # out of order: as each ends
    by_key = {r.key: (r, step) for r, step in sink.results}
    short, long = min(lengths, key=lengths.get), max(lengths, key=lengths.get)
    assert lengths[short] < lengths[long]
    # the short row's result was put steps before the long row's last step
    assert by_key[short][1] < by_key[long][1]
    assert by_key[short][0].output_tokens <= lengths[short] < by_key[long][0].output_tokens
    assert arrived.index(short) < arrived.index(long)


@pytest.mark.parametrize("budget", [None, 2], ids=["slots", "token budget"])
def test_a_group_joins_rows_near_the_oldest_in_length(tiny_model, budget):
    """Photos of two sizes waiting in alternation: each group is the oldest row and the rows
    nearest it in length (one size, not the arrival order's mix, whose prefill pads every row
    to the larger), within batching.max_tokens_per_batch; every row still comes out."""
    requests = [r for r in engine_requests(12) if r.image.size != (84, 140)]  # 112x84, 56x56
    for r in requests:
        r.prompt = "Describe this image."
    assert [r.vision_tokens for r in requests[:4]] == [12, 4, 12, 4]
    cfg = _config(tiny_model, "inflight", slots=4)
    if budget:  # room for two rows of the larger size, not three
        counter = make_engine(cfg)
        try:
            need = counter.count_text_tokens(requests[0].prompt, None) + 12
        finally:
            counter.close()
        cost = budget_tokens(need, cfg.sampling.max_tokens)
        cfg.batching.max_tokens_per_batch = 2 * cost + cost // 2
    engine = make_engine(cfg)
    sink = Sink(engine)
    sink.want = len(requests)
    try:
        engine.start(sink)
        engine.submit(requests)  # all waiting at once: the first group chooses among them
        assert sink.done.wait(60), f"{len(sink.results)} of {len(requests)} results"
    finally:
        engine.close()
    assert sink.error is None
    size = {r.key: r.image.size for r in requests}
    first = sink.groups[0]
    assert first[0] == requests[0].key  # the oldest goes first
    assert {size[k] for k in first} == {(112, 84)}, first
    assert len(first) == (2 if budget else 4)
    assert sorted(k for g in sink.groups for k in g) == sorted(r.key for r in requests)
    assert all(r.error_code is None for r, _ in sink.results)


def test_a_groups_host_inputs_are_made_while_the_running_rows_decode(tiny_model, lockstep_answers):
    """The template, tokens and pixels of a joining group are made off the scheduler thread:
    rows already running take decode steps meanwhile (before, the GPU waited for the CPU at
    every join), and the answers still equal lock-step's."""
    requests, want = lockstep_answers
    engine = make_engine(_config(tiny_model, "inflight", slots=3))
    made = engine.hf.inputs.host_side
    steps_when_made: list[int] = []

    def slow(batch):
        time.sleep(0.3)
        steps_when_made.append(engine.steps)
        return made(batch)

    engine.hf.inputs.host_side = slow
    sink = Sink(engine)
    sink.want = len(requests)
    try:
        engine.start(sink)
        engine.submit(requests)
        assert sink.done.wait(60), f"{len(sink.results)} of {len(requests)} results"
    finally:
        engine.close()
    assert sink.error is None
    # per group: (rows running when it entered, decode steps from then until its inputs were made)
    joins = zip(sink.entered, sink.steps_at_entry, steps_when_made, strict=True)
    during = [(running, ready - entry) for (_, running), entry, ready in joins]
    assert any(running for running, _ in during), during
    assert all(steps > 0 for running, steps in during if running), during
    got = {r.key: r for r, _ in sink.results}
    assert {k: _fields(r) for k, r in got.items()} == {k: _fields(r) for k, r in want.items()}


def test_a_poison_row_fails_alone(tiny_model, lockstep_answers):
    """A row whose inputs raise (an image off the 28-pixel grid) is an ENGINE_ERROR; the rows
    prefilled in its group still get the lock-step answers."""
    from PIL import Image

    requests, want = lockstep_answers
    requests = list(requests[:5])
    bad = engine_requests(1)[0]
    bad.key, bad.row_id, bad.image = ("unit", 99), "row-99", Image.new("RGB", (30, 30))
    requests.insert(2, bad)
    engine = make_engine(_config(tiny_model, "inflight", slots=8))
    try:
        sink = _run_inflight(engine, requests)
    finally:
        engine.close()
    got = {r.key: r for r, _ in sink.results}
    assert got[bad.key].error_code == RowError.ENGINE_ERROR
    assert "grid" in got[bad.key].error_message
    for req in requests:
        if req is not bad:
            assert _fields(got[req.key]) == _fields(want[req.key]), req.key


def test_schedule_setting_is_checked():
    with pytest.raises(ConfigError, match=r"engine\.hf\.schedule"):
        HFEngineConfig(schedule="sometimes")
    with pytest.raises(ConfigError, match=r"engine\.hf\.slots"):
        HFEngineConfig(slots=-1)
    with pytest.raises(ConfigError, match=r"engine\.hf\.inflight_cache"):
        HFEngineConfig(inflight_cache="paged")
    with pytest.raises(ConfigError, match=r"engine\.hf\.inflight_tokens"):
        HFEngineConfig(inflight_tokens=-1)


def test_inflight_refuses_the_compiled_decode_on_the_dynamic_cache(tiny_model):
    hf = {"compile": True, "inflight_cache": "dynamic"}
    with pytest.raises(ValueError, match=r"engine\.hf\.compile=true"):
        make_engine(_config(tiny_model, "inflight", hf=hf))


def test_inflight_cache_auto_is_static_where_the_step_compiles(tiny_model):
    """The default (auto): static slots with the compiled step where the decode compiles (on
    CPU, compile: true), the dynamic cache where it is eager (CPU, compile: null)."""
    assert HFEngineConfig().inflight_cache == "auto"
    for hf, cache, decode in (({}, "dynamic", "eager"), ({"compile": True}, "static", "compiled")):
        engine = make_engine(_config(tiny_model, "inflight", slots=2, hf=hf))
        try:
            assert (engine.modes()["inflight_cache"], engine.modes()["decode"]) == (cache, decode)
        finally:
            engine.close()


def test_static_slots_need_full_attention_in_every_layer(tiny_model):
    """A text model with sliding-window layers cannot take static slots (their step's mask is
    full attention): ``slots_fit`` says so (auto reads it for the dynamic cache), static is
    refused with a message."""
    config = transformers.AutoConfig.from_pretrained(tiny_model)
    hf = SimpleNamespace(model=SimpleNamespace(config=config))
    text = config.get_text_config(decoder=True)
    text.layer_types = ["full_attention"] * text.num_hidden_layers
    assert slots_fit(hf)
    text.layer_types[-1] = "sliding_attention"
    assert not slots_fit(hf)
    with pytest.raises(ValueError, match="sliding-window"):
        job_slots(hf, slots=2, tokens=0, penalty=False, compiled=False)


@pytest.mark.parametrize("cache", CACHES)
def test_repetition_penalty_over_each_rows_own_tokens(tiny_model, cache):
    """sampling.repetition_penalty in flight: each row's answer is the lock-step engine's for
    that row alone (a lock-step batch also penalises its padding token in padded rows)."""
    requests = engine_requests(6)
    sampling = SamplingConfig(max_tokens=16, repetition_penalty=1.5)
    lockstep = make_batch_engine(_config(tiny_model, "lockstep", sampling=sampling))
    plain = make_batch_engine(_config(tiny_model, "lockstep"))
    try:
        want = {r.key: lockstep.generate([r])[0] for r in requests}
        unpenalised = {r.key: plain.generate([r])[0] for r in requests}
    finally:
        lockstep.close()
        plain.close()
    assert any(_fields(want[k]) != _fields(unpenalised[k]) for k in want)  # it does something
    hf = {"inflight_cache": cache}
    engine = make_engine(_config(tiny_model, "inflight", slots=2, sampling=sampling, hf=hf))
    try:
        sink = _run_inflight(engine, requests, parts=2)
    finally:
        engine.close()
    for result, _ in sink.results:
        assert _fields(result) == _fields(want[result.key]), result.key


@pytest.mark.parametrize("cache", CACHES)
def test_guided_answers_in_flight_equal_lockstep_and_parse(tiny_model, cache):
    """Each row's grammar joins and leaves with it: the guided answers (the random model's
    noise bounded to the moderation schema) are the lock-step engine's and parse."""
    pytest.importorskip("xgrammar")
    from qvl_batch.output.structured import OutputParser

    from ..conftest import MODERATION

    structured = StructuredConfig(json_schema=MODERATION, guided="required")
    requests = engine_requests(6, prompt="Moderate this image.")
    knobs = {"max_tokens": 96, "lengths": "", "structured": structured}
    lockstep = make_batch_engine(_config(tiny_model, "lockstep", **knobs))
    try:
        want = {r.key: r for r in lockstep.generate(requests)}
    finally:
        lockstep.close()
    engine = make_engine(
        _config(tiny_model, "inflight", slots=2, hf={"inflight_cache": cache}, **knobs)
    )
    try:
        assert engine.guided
        sink = _run_inflight(engine, requests, parts=2)
    finally:
        engine.close()
    got = {r.key: r for r, _ in sink.results}
    parser = OutputParser(MODERATION)
    for key, ref in want.items():
        assert _fields(got[key]) == _fields(ref), key
        assert got[key].finish_reason == "stop", got[key].text
        values, error = parser.parse(got[key].text, "stop")
        assert error is None or "non-unique" in error, error  # xgrammar leaves uniqueItems
        assert values is None or values["verdict"] in ("allow", "review", "block")


@pytest.mark.parametrize("cache", CACHES)
def test_a_failing_decode_step_puts_its_rows_back(tiny_model, lockstep_answers, caplog, cache):
    """A decode step that raises once (a transient fault): its rows are prefilled again and
    still get the lock-step answers."""
    requests, want = lockstep_answers
    engine = make_engine(_config(tiny_model, "inflight", slots=4, hf={"inflight_cache": cache}))
    model = engine.hf.model
    forward, decode_steps = model.forward, []

    def flaky(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == 1:  # a decode step
            decode_steps.append(kwargs["input_ids"].shape[0])
            if len(decode_steps) == 5:
                raise RuntimeError("transient")
        return forward(*args, **kwargs)

    model.forward = flaky
    try:
        sink = _run_inflight(engine, requests[:6])
    finally:
        engine.close()
    got = {r.key: r for r, _ in sink.results}
    assert len(got) == 6 and "a decode step of" in caplog.text
    for req in requests[:6]:
        assert _fields(got[req.key]) == _fields(want[req.key]), req.key


def test_rows_of_a_decode_step_that_always_fails_are_errors(tiny_model):
    engine = make_engine(_config(tiny_model, "inflight", slots=4))
    model = engine.hf.model
    forward = model.forward

    def broken(*args, **kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            raise RuntimeError("poison")
        return forward(*args, **kwargs)

    model.forward = broken
    try:
        sink = _run_inflight(engine, engine_requests(3))
    finally:
        engine.close()
    assert {(r.error_code, r.error_message) for r, _ in sink.results} == {
        (RowError.ENGINE_ERROR, "RuntimeError: poison")
    }


@pytest.mark.parametrize("cache", CACHES)
def test_a_row_that_poisons_decode_fails_alone(tiny_model, lockstep_answers, caplog, cache):
    """A row whose every decode step raises (it prefills fine) among good rows: the rows it
    ran with are put back as a cohort and run by themselves in halves, so only it ends as an
    ENGINE_ERROR; every other row gets the lock-step answer."""
    requests, want = lockstep_answers
    requests = list(requests[:7])
    bad = requests[3]
    engine = make_engine(_config(tiny_model, "inflight", slots=4, hf={"inflight_cache": cache}))
    step = engine._step

    def poisoned():
        rows = engine._running.rows
        if any(row is not None and not row.done and row.req.key == bad.key for row in rows):
            raise RuntimeError("poison row")
        return step()

    engine._step = poisoned
    try:
        sink = _run_inflight(engine, requests)
    finally:
        engine.close()
    got = {r.key: r for r, _ in sink.results}
    assert len(sink.results) == len(requests) == len(got)
    assert (got[bad.key].error_code, got[bad.key].error_message) == (
        RowError.ENGINE_ERROR,
        "RuntimeError: poison row",
    )
    for req in requests:
        if req is not bad:
            assert _fields(got[req.key]) == _fields(want[req.key]), req.key
    assert "a decode step of" in caplog.text


def test_take_back_gives_back_a_unit_still_waiting_for_slots(tiny_model):
    requests = engine_requests(5)
    for req in requests[3:]:
        req.key = ("other", req.key[1])
    engine = make_engine(_config(tiny_model, "inflight", slots=1))
    sink = Sink(engine)
    sink.want = 3
    try:
        engine.start(sink)
        engine.submit(requests[:3])
        deadline = time.monotonic() + 30
        while not sink.entered and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.take_back("unit") is None  # its first row has started
        engine.submit(requests[3:])  # one slot: they wait behind the unit's other rows
        assert engine.take_back("other") == 2
        assert sink.done.wait(60)
        time.sleep(0.2)
    finally:
        engine.close()
    assert sorted(r.key for r, _ in sink.results) == [("unit", 0), ("unit", 1), ("unit", 2)]
    assert engine.take_back("unit") == 0  # all out: nothing started, nothing waiting


def _long_and_short(tiny_model):
    """Three rows of short prompts then three of ~250 tokens, and the lock-step answers."""
    long = engine_requests(6, prompt="Describe this image in a few words. " * 16)
    requests = engine_requests(6)[:3] + long[3:]
    lockstep = make_batch_engine(_config(tiny_model, "lockstep"))
    try:
        want = {r.key: r for r in lockstep.generate(requests)}
    finally:
        lockstep.close()
    assert min(want[r.key].prompt_tokens for r in long[3:]) > 128
    return requests, want


@pytest.mark.parametrize("tokens", [0, 100], ids=["sized by the rows", "inflight_tokens=100"])
def test_static_slots_grow_for_a_prompt_past_them(tiny_model, caplog, tokens):
    """Slots of the grid's first length (128: engine.hf.inflight_tokens 0, the slots grow to
    the rows as they come; or 100, set too short) take rows whose prompts pass them (~250
    tokens) while short ones decode: the slots grow, the rows in them are kept, every answer is
    the lock-step engine's. Only a length the job set is warned about."""
    caplog.set_level("INFO", logger="qvl_batch.engines.hf.slots")
    requests, want = _long_and_short(tiny_model)
    hf = {"inflight_cache": "static", "inflight_tokens": tokens}
    engine = make_engine(_config(tiny_model, "inflight", slots=2, hf=hf))
    try:
        assert engine._slot_batch.cache.length == 128
        sink = _run_inflight(engine, requests, parts=2)
        assert engine._slot_batch.cache.length > 128
    finally:
        engine.close()
    growth = [r for r in caplog.records if "do not fit the static slots" in r.getMessage()]
    assert growth and {r.levelname for r in growth} == {"WARNING" if tokens else "INFO"}
    for result, _ in sink.results:
        assert _fields(result) == _fields(want[result.key]), result.key


def test_compiled_slots_grow_with_one_graph_a_length(tiny_model, caplog):
    """Compiled, slots sized by the rows: wider groups grow them mid-decode; the step
    compiles once for each length (a new shape), and every answer is the lock-step engine's."""
    from torch._dynamo.utils import counters

    caplog.set_level("INFO", logger="qvl_batch.engines.hf.slots")
    requests, want = _long_and_short(tiny_model)
    hf = {"inflight_cache": "static", "compile": True}
    engine = make_engine(_config(tiny_model, "inflight", slots=2, hf=hf))
    try:
        counters.clear()
        sink = _run_inflight(engine, requests, parts=2)
        lengths = engine._slot_batch.cache.length
        graphs = counters["stats"]["unique_graphs"]
    finally:
        engine.close()
    growths = sum("do not fit the static slots" in r.getMessage() for r in caplog.records)
    assert lengths > 128 and growths >= 1
    assert graphs == 1 + growths, (lengths, growths, dict(counters["stats"]))
    for result, _ in sink.results:
        assert _fields(result) == _fields(want[result.key]), result.key


def test_rows_past_the_caches_cap_run_by_themselves(tiny_model, caplog):
    """Slots that would pass engine.hf.static_cache_gib to hold a row do not grow: the long
    rows decode by themselves on their own cache, the short ones in the slots; every answer is
    the lock-step engine's, none an error."""
    requests, want = _long_and_short(tiny_model)
    hf = {"inflight_cache": "static", "inflight_tokens": 100}
    engine = make_engine(_config(tiny_model, "inflight", slots=2, hf=hf))
    cache = engine._slot_batch.cache
    engine.close()
    gib = 2 * 128 * kv_bytes_per_token(cache.text, cache.dtype) / 2**30  # the first slots
    hf["static_cache_gib"] = gib
    engine = make_engine(_config(tiny_model, "inflight", slots=2, hf=hf))
    try:
        sink = _run_inflight(engine, requests, parts=2)
        assert engine._slot_batch.cache.length == 128
    finally:
        engine.close()
    assert "run by themselves" in caplog.text
    assert any(ref.prompt_tokens > 128 for ref in want.values())
    got = {r.key: r for r, _ in sink.results}
    for key, ref in want.items():
        assert _fields(got[key]) == _fields(ref), key


def test_slots_sized_by_the_rows_not_the_jobs_bound(tiny_model):
    """engine.hf.inflight_tokens 0: the slots start at the grid's first length and grow to
    what the rows need (a short prompt, a small image and 16 tokens: 128), not to the job's
    bound (4096 prompt tokens, 1280 vision tokens: every step would read ~5,400 columns)."""
    requests, want = _long_and_short(tiny_model)
    short = requests[:3]
    engine = make_engine(_config(tiny_model, "inflight", slots=2, hf={"inflight_cache": "static"}))
    try:
        sink = _run_inflight(engine, short)
        length = engine._slot_batch.cache.length
    finally:
        engine.close()
    assert length == 128
    for result, _ in sink.results:
        assert _fields(result) == _fields(want[result.key]), result.key


def test_static_slots_within_the_caches_cap(tiny_model):
    """The slots are accounted before they are taken: past engine.hf.static_cache_gib the
    engine is refused, saying what to lower."""
    hf = {"inflight_cache": "static", "static_cache_gib": 0.0001}
    with pytest.raises(ValueError, match=r"over the static caches' cap.*engine\.hf\.slots"):
        make_engine(_config(tiny_model, "inflight", slots=16, hf=hf))


@pytest.mark.parametrize("attention", ["stock", "grouped"])
def test_static_slots_compiled_step_one_graph_equal_answers(
    tiny_model, lockstep_answers, attention
):
    """engine.hf.compile: true with the static slots (torch.compile's default mode on CPU; CUDA
    graphs on a GPU): rows join mid-decode and leave, the step's shapes never change, so Dynamo
    makes one graph for the job; the answers are the lock-step engine's token for token."""
    from torch._dynamo.utils import counters

    requests, want = lockstep_answers
    hf = {"inflight_cache": "static", "compile": True, "decode_attention": attention}
    engine = make_engine(_config(tiny_model, "inflight", slots=3, hf=hf))
    try:
        assert engine.modes()["decode"] == "compiled"
        counters.clear()
        sink = _run_inflight(engine, requests, parts=2)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        engine.close()
    assert graphs == 1, dict(counters["stats"])
    assert any(running for _, running in sink.entered), sink.entered  # joins mid-decode
    got = {r.key: r for r, _ in sink.results}
    for key, ref in want.items():
        assert _fields(got[key]) == _fields(ref), key


def test_compiled_step_writes_each_slots_kv_in_place(tiny_model):
    """Inductor's code for the static slots' step writes each row's new KV at its column in
    place (``index_put``). A ``scatter_`` there compiled to a scatter into a new buffer and a copy
    of the whole cache back, every layer, every step: 8.6 of an H100's 18.4 ms a step
    (docs/INFLIGHT.md)."""
    from torch._inductor.utils import run_and_get_code

    hf = {"inflight_cache": "static", "compile": True}
    engine = make_engine(_config(tiny_model, "inflight", slots=3, hf=hf))
    try:
        batch = engine._slot_batch
        torch._dynamo.reset()  # a fresh compile: its code is what comes back
        with torch.inference_mode():
            _, code = run_and_get_code(
                batch.forward, engine.hf.model, engine._cache_kwarg, engine._decode_step
            )
    finally:
        engine.close()
    source = "\n".join(code)
    assert "index_put" in source
    assert "scatter" not in source
