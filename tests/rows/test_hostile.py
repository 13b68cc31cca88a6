"""The hostile corpus (tests/hostile.py): every case gets its documented outcome without a warning
escaping, header refusals decode nothing and stay small in memory, and a whole job over the corpus
accounts for every row.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from qvl_batch.config import ImageConfig
from qvl_batch.errors import IMAGE_CODES, RowFailure
from qvl_batch.rows.images import TILE, prepare_image, smart_resize, vision_tokens
from qvl_batch.run.validate import load_job

from ..conftest import REPO, expected_for, read_output, write_job
from ..hostile import BOMB_SIDE, Case, corpus, png_bomb, same_notes

CASES = corpus()
HEADER_REFUSALS = ("UNSUPPORTED_FORMAT", "IMAGE_TOO_LARGE", "IMAGE_TOO_SMALL", "ASPECT_RATIO")
ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")  # e.g. Pillow's "<_io.BytesIO object at 0x7f...>"


def near(pixel, expected, tol: int = 24) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def grid_size(size: tuple[int, int], cfg: ImageConfig) -> tuple[int, int]:
    """(width, height) on the 28-grid for an upright source size, by Qwen's rule."""
    height, width = smart_resize(size[1], size[0], cfg.min_pixels, cfg.max_pixels)
    return width, height


# ---------------------------------------------------------------- every case, its outcome


def test_corpus_covers_every_image_code_once_named():
    assert {case.expected.outcome for case in CASES} == set(IMAGE_CODES) | {"OK"}
    assert len({case.name for case in CASES}) == len(CASES), "names are row ids end to end"
    assert all(case.expected.size for case in CASES if case.expected.outcome == "OK")


@pytest.mark.filterwarnings("error")  # Pillow's warnings are row notes: none may escape
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case_outcome(case: Case):
    cfg = ImageConfig()
    expected = case.expected
    if expected.outcome != "OK":
        with pytest.raises(RowFailure) as info:
            prepare_image(case.data, cfg)
        message = info.value.message
        assert info.value.code == expected.outcome, message
        assert expected.detail in message
        assert "\n" not in message and len(message) <= 200
        assert not ADDRESS.search(message), "messages must not change from run to run"
        return

    prepared = prepare_image(case.data, cfg)
    width, height = grid_size(expected.size, cfg)
    assert prepared.original_size == expected.size
    assert prepared.resized_size == (width, height)
    assert width % TILE == 0 and height % TILE == 0
    assert prepared.image.mode == "RGB" and prepared.image.size == (width, height)
    assert prepared.vision_tokens == vision_tokens(height, width)
    assert same_notes(prepared.notes, expected.notes), prepared.notes
    for (fx, fy), colour in expected.marks:
        point = (min(int(fx * width), width - 1), min(int(fy * height), height - 1))
        assert near(prepared.image.getpixel(point), colour), (point, colour)


# ---------------------------------------------------------------- refused from the header


def _image_file_classes() -> list[type]:
    Image.init()  # import every plugin, so every ImageFile subclass exists
    found, todo = [], [ImageFile.ImageFile]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Records every load() of any Pillow image file class, and any Ghostscript run."""
    calls: list[str] = []

    def spy(original):
        def load(self, *args, **kwargs):
            calls.append(f"{type(self).__name__}.load")
            return original(self, *args, **kwargs)

        return load

    for cls in _image_file_classes():
        if "load" in vars(cls):
            monkeypatch.setattr(cls, "load", spy(vars(cls)["load"]))

    def ghostscript(*args, **kwargs):
        calls.append("Ghostscript")
        raise AssertionError("Ghostscript must never run")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    return calls


def test_header_refusals_decode_no_pixels(decodes):
    refusals = [case for case in CASES if case.expected.outcome in HEADER_REFUSALS]
    assert {case.expected.outcome for case in refusals} == set(HEADER_REFUSALS)
    for case in refusals:
        with pytest.raises(RowFailure) as info:
            prepare_image(case.data, ImageConfig())
        assert info.value.code == case.expected.outcome, case.name
        assert decodes == [], case.name
    # The spy does see decodes: an allowed image is loaded once.
    prepare_image(next(c.data for c in CASES if c.name == "bmp_rgb"), ImageConfig())
    assert decodes


MEMORY_PROBE = r"""
import io, json, sys, warnings
from PIL import Image
from qvl_batch.config import ImageConfig
from qvl_batch.errors import RowFailure
from qvl_batch.rows.images import prepare_image

warnings.simplefilter("ignore")


def peak():
    # VmHWM: this process's peak RSS. Not ru_maxrss: Linux carries that over fork and exec, so
    # it would start at the (large) pytest parent's peak and never move.
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def read(path):
    with open(path, "rb") as f:
        return f.read()


growth = {}
for path in sys.argv[1:]:
    data = read(path)
    before = peak()
    try:
        prepare_image(data, ImageConfig())
        code = "OK"
    except RowFailure as exc:
        code = exc.code
    growth[path] = [code, peak() - before]
data = read(sys.argv[-1])  # the gauge works: Pillow's own decode of the real bomb
before = peak()
with Image.open(io.BytesIO(data)) as img:
    img.load()
print(json.dumps({"cases": growth, "control": peak() - before}))
"""


def test_bombs_refused_in_bounded_memory(tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("peak RSS is read from /proc/self/status (Linux)")
    bombs = [
        case
        for case in CASES
        if case.expected.outcome == "IMAGE_TOO_LARGE" or "size limit" in case.expected.detail
    ]
    paths = []
    for case in bombs:
        path = tmp_path / case.name
        path.write_bytes(case.data)
        paths.append(str(path))
    real_bomb = tmp_path / "real_bomb.png"  # last: the control decodes it
    real_bomb.write_bytes(png_bomb(BOMB_SIDE))
    paths.append(str(real_bomb))
    # A fresh process: this one's high-water mark is already set by earlier tests.
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *paths],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    result = json.loads(probe.stdout)
    mib = 1 << 20
    assert result["control"] > 100 * mib, "a full decode of the bomb must show in the gauge"
    expected = {str(tmp_path / case.name): case.expected.outcome for case in bombs}
    expected[str(real_bomb)] = "IMAGE_TOO_LARGE"
    for path, (code, growth) in result["cases"].items():
        assert code == expected[path], path
        assert growth < 50 * mib, f"{Path(path).name}: peak RSS grew {growth / mib:.0f} MiB"


# ---------------------------------------------------------------- a whole job


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_corpus_job_accounts_for_every_row(tmp_path, ray_head):
    from qvl_batch.errors import Exit
    from qvl_batch.run.driver import run_job

    ids = [f"hostile-{i:03d}-{case.name}" for i, case in enumerate(CASES)]
    expected = {row_id: case.expected for row_id, case in zip(ids, CASES)}
    images = {row_id: case.data for row_id, case in zip(ids, CASES)}
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "image": pa.array([case.data for case in CASES], pa.binary()),
            "source": pa.array([f"hostile/{case.name}" for case in CASES], pa.string()),
        }
    )
    data_dir, out = tmp_path / "data", tmp_path / "out"
    data_dir.mkdir()
    pq.write_table(table, data_dir / "part-00000.parquet", row_group_size=16)
    job = write_job(tmp_path / "job.yaml", data_dir, out, ray_head, limits__max_error_fraction=1.0)

    summary = run_job(load_job(job), progress_bar=False)

    assert summary.exit_code == Exit.OK, summary.lines()
    data, errors = read_output(out)
    assert sorted([r["id"] for r in data] + [r["id"] for r in errors]) == sorted(ids)
    assert {r["id"]: r["error_code"] for r in errors} == {
        row_id: exp.outcome for row_id, exp in expected.items() if exp.outcome != "OK"
    }
    cfg = ImageConfig()
    for row in data:
        exp = expected[row["id"]]
        assert exp.outcome == "OK", row["id"]
        assert (row["image_width"], row["image_height"]) == exp.size, row["id"]
        assert (row["resized_width"], row["resized_height"]) == grid_size(exp.size, cfg)
        assert same_notes(filter(None, (row["image_notes"] or "").split(",")), exp.notes), row["id"]
        assert row["text"] == expected_for(images[row["id"]], "Describe this image.")[0]
        assert row["source"] == f"hostile/{row['id'].split('-', 2)[2]}"
    codes = Counter(exp.outcome for exp in expected.values() if exp.outcome != "OK")
    assert summary.error_codes == dict(codes)
    assert (summary.data_rows, summary.error_rows) == (len(ids) - codes.total(), codes.total())
