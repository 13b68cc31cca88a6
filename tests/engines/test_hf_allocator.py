"""The hf engine's CUDA allocator settings (engines/hf/allocator.py): expandable segments unless
the user chose otherwise, before CUDA starts or after."""

from __future__ import annotations

import torch

from qvl_batch.engines.hf import allocator


def _clear(monkeypatch):
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)


def test_expandable_segments_before_cuda_starts(monkeypatch):
    import os

    _clear(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert allocator.settle_allocator() == "expandable_segments:True"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_the_allocator_told_directly_once_cuda_runs(monkeypatch):
    import os

    _clear(monkeypatch)
    told = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", told.append)
    assert allocator.settle_allocator() == "expandable_segments:True"
    assert told == ["expandable_segments:True"]
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_the_users_setting_is_kept(monkeypatch):
    import os

    _clear(monkeypatch)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:512")
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", lambda s: 1 / 0)
    said = allocator.settle_allocator()
    assert said == "PYTORCH_ALLOC_CONF=max_split_size_mb:512 (the user's)"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
