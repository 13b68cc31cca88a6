"""One vocabulary of failure (qvl_batch/errors.py): every row error code and exit code is
defined there, documented in the README, and spelled nowhere else."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pyarrow as pa

from qvl_batch.errors import (
    IMAGE_CODES,
    MEANINGS,
    ConfigError,
    Exit,
    InputError,
    QvlError,
    ResumeRefused,
    RowError,
    StorageError,
    exit_for,
)

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _readme_table(header: str) -> list[str]:
    """The first column of the README table whose header row starts with ``| header |``."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip())
    return rows


def test_the_readme_error_table_is_the_enum():
    assert _readme_table("error_code") == [c.value for c in RowError]


def test_the_readme_exit_codes_are_the_enum():
    documented = [int(c) for c in _readme_table("code")]
    assert set(documented) <= {int(e) for e in Exit}
    assert {Exit.OK, Exit.CONFIG, Exit.REFUSED, Exit.FAILED, Exit.INTERRUPTED} <= set(documented)


def test_every_code_has_a_meaning_and_image_codes_are_codes():
    assert set(MEANINGS) == set(RowError) and all(MEANINGS[c] for c in RowError)
    assert set(IMAGE_CODES) < set(RowError)
    assert RowError.DECODE_ERROR.meaning == MEANINGS[RowError.DECODE_ERROR]


def test_a_code_is_written_as_its_plain_name():
    code = RowError.ENGINE_ERROR
    assert code == "ENGINE_ERROR" and str(code) == "ENGINE_ERROR" and f"{code}" == "ENGINE_ERROR"
    assert json.dumps({"c": code}) == '{"c": "ENGINE_ERROR"}'
    assert pa.array([code, None]).to_pylist() == ["ENGINE_ERROR", None]
    assert {code: 1} == {"ENGINE_ERROR": 1}


def test_exit_codes_of_the_errors_commands_catch():
    assert exit_for(ResumeRefused("x")) == Exit.REFUSED
    for exc in (ConfigError("x"), InputError("x"), StorageError("x")):
        assert exit_for(exc) == Exit.CONFIG and isinstance(exc, QvlError)
    assert isinstance(ConfigError("x"), ValueError)  # callers that catch ValueError still do


def _literals(tree: ast.AST) -> list[tuple[int, str]]:
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_no_module_spells_an_error_code():
    codes = {c.value for c in RowError}
    spelled = []
    for path in (ROOT / "qvl_batch").rglob("*.py"):
        if path.name == "errors.py":
            continue
        for line, text in _literals(ast.parse(path.read_text())):
            words = set(re.findall(r"\b[A-Z][A-Z_]+\b", text))
            # a code, or a short string holding one (not prose, a docstring, that names one)
            if text in codes or (len(text) < 40 and words & codes):
                spelled.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert not spelled, "use qvl_batch.errors.RowError:\n" + "\n".join(spelled)


def test_the_check_finds_a_spelled_code():
    tree = ast.parse('x = Result(key, error_code="ENGINE_ERROR")\ny = "fine"\n')
    codes = {c.value for c in RowError}
    assert [t for _, t in _literals(tree) if t in codes] == ["ENGINE_ERROR"]
