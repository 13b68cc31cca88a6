"""Shared model fixtures: a tiny random-weight Qwen2.5-VL built once per test session.

Test modules use it with ``pytest_plugins = ["tests.models"]``.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny Qwen2.5-VL model directory (random weights, real architecture)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from qvl_batch.tooling.modelgen import make_test_model

    return make_test_model(str(tmp_path_factory.mktemp("tiny-qwen2.5-vl")), "tiny", seed=0)
