"""``qvl-batch doctor``: versions, GPUs (torch or nvidia-smi), engine readiness, bad combos."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from qvl_batch.cli import main
from qvl_batch.commands import doctor


def fake_versions(monkeypatch, **versions: str | None) -> None:
    """Pretend these distributions are installed at these versions (None = not installed)."""
    real = importlib.metadata.version
    labels = {dist: label for label, dists in doctor.PACKAGES for dist in dists}

    def version(dist: str) -> str:
        label = labels.get(dist, dist)
        if label in versions:
            if versions[label] is None:
                raise importlib.metadata.PackageNotFoundError(dist)
            return versions[label]
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)


@pytest.fixture
def no_gpu_tools(monkeypatch, tmp_path):
    """No nvidia-smi on PATH and no torch: the host looks GPU-less whatever it is."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setitem(sys.modules, "torch", None)


def fake_nvidia_smi(tmp_path: Path, monkeypatch, output: str, code: int = 0) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-smi"
    # A Python script: PATH holds only this folder, so no shell tools are reachable from it.
    exe.write_text(f"#!{sys.executable}\nimport sys\nprint({output!r})\nsys.exit({code})\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def run(capsys) -> str:
    assert doctor.run_doctor() == 0
    return capsys.readouterr().out


def test_lists_every_package_and_python(capsys, no_gpu_tools):
    out = run(capsys)
    for label, _ in doctor.PACKAGES:
        assert f"  {label}" in out
    assert "python" in out and sys.executable in out
    assert f"numpy         {importlib.metadata.version('numpy')}" in out
    assert "fake          OK" in out


def test_missing_packages_are_reported_with_hints(capsys, monkeypatch, no_gpu_tools):
    fake_versions(monkeypatch, tensorrt_llm=None, tensorrt=None, torch=None)
    out = run(capsys)
    assert "tensorrt_llm  missing" in out and "tensorrt      missing" in out
    assert "torch         missing" in out
    assert "hf            MISSING: torch" in out and "qvl-batch[hf]" in out
    trt_line = next(line for line in out.splitlines() if line.startswith("  trtllm"))
    assert "MISSING: tensorrt_llm" in trt_line and "TensorRT-LLM release container" in trt_line
    assert "GPU" in trt_line and "no GPUs found" in out
    assert "OK: no known-incompatible versions" in out


def test_torch_cuda_gpus_are_listed(capsys, monkeypatch, tmp_path):
    props = SimpleNamespace(name="NVIDIA H200", total_memory=143771 * 2**20)
    cuda = SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 2, get_device_properties=lambda i: props
    )
    monkeypatch.setitem(
        sys.modules, "torch", SimpleNamespace(version=SimpleNamespace(cuda="12.8"), cuda=cuda)
    )
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    fake_versions(monkeypatch, torch="2.9.0", transformers="4.57.3", tensorrt_llm="1.2.1")
    out = run(capsys)
    assert "torch CUDA    12.8, available: yes" in out
    assert "GPU 0         NVIDIA H200, 143771 MiB (via torch)" in out
    assert "GPU 1" in out
    assert "trtllm        OK" in out and "hf            OK" in out


def test_nvidia_smi_is_asked_without_torch(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    fake_nvidia_smi(tmp_path, monkeypatch, "NVIDIA H200, 143771 MiB, 570.86.15")
    fake_versions(monkeypatch, torch=None, tensorrt_llm="1.2.1", numpy="1.26.4")
    out = run(capsys)
    assert "driver        570.86.15" in out
    assert "GPU 0         NVIDIA H200, 143771 MiB (via nvidia-smi)" in out
    assert "trtllm        OK" in out


def test_failing_nvidia_smi_is_a_note_not_a_crash(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    msg = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    fake_nvidia_smi(tmp_path, monkeypatch, msg, code=9)
    fake_versions(monkeypatch, torch=None)
    out = run(capsys)
    assert "note: nvidia-smi failed: NVIDIA-SMI has failed" in out
    assert "no GPUs found" in out


def test_trtllm_1_2_flags_transformers_and_numpy(capsys, monkeypatch, no_gpu_tools):
    fake_versions(monkeypatch, tensorrt_llm="1.2.1", transformers="5.24.0", numpy="2.4.6")
    out = run(capsys)
    assert (
        "WARNING: tensorrt_llm 1.2.1 wants transformers==4.57.3, found transformers 5.24.0" in out
    )
    assert "WARNING: tensorrt_llm 1.2.1 wants numpy<2, found numpy 2.4.6" in out


def test_trtllm_1_2_with_its_pins_is_ok(capsys, monkeypatch, no_gpu_tools):
    fake_versions(monkeypatch, tensorrt_llm="1.2.0rc2", transformers="4.57.3", numpy="1.26.4")
    out = run(capsys)
    assert "WARNING" not in out
    assert "OK: no known-incompatible versions" in out


def test_cli_doctor_exits_zero(capsys, no_gpu_tools):
    assert main(["doctor"]) == 0
    assert "Engines" in capsys.readouterr().out


def test_pins_spec_forms():
    assert doctor._meets("4.57.3", "==4.57.3") and not doctor._meets("4.57.2", "==4.57.3")
    assert doctor._meets("1.26.4", "<2") and not doctor._meets("2.0.0", "<2")


def test_shared_memory_is_checked_against_the_trtllm_in_flight_bound():
    need = 128 * 1280 * 4 * 1176 * 4  # about 24 MB a 1280-token image, 128 inside an actor
    assert abs(need / 128 - 24.1e6) < 0.1e6
    ok = doctor.shm_lines(2 * need, actors=1)
    assert ok[0].endswith(": OK") and "2.9 GiB" in ok[0]
    small = doctor.shm_lines(64 * 2**20, actors=1)  # Docker's default
    assert small[0].endswith("TOO SMALL") and "--shm-size" in small[1] and "--ipc=host" in small[1]
    assert doctor.shm_lines(2 * need, actors=8)[0].endswith("TOO SMALL")  # 8 actors on a node
    assert "not found" in doctor.shm_lines(None, actors=1)[0]
