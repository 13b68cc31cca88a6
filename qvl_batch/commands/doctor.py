"""``qvl-batch doctor``: what is installed, which GPUs are visible, which engines can run here.

Versions come from package metadata, so nothing heavy is imported to list them; torch alone is
imported, to ask CUDA for its GPUs (without torch, ``nvidia-smi`` is asked instead). The report
ends with what each engine is missing, how to get it, and known-bad version combinations.
It only reports: the exit code is 0 whatever it finds.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from .. import __version__
from ..engines import REGISTRY

# (label, distribution names to try): NVIDIA publishes TensorRT under several names.
PACKAGES: list[tuple[str, tuple[str, ...]]] = [
    ("qvl-batch", ("qvl-batch",)),
    ("tensorrt_llm", ("tensorrt_llm",)),
    ("tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")),
    ("torch", ("torch",)),
    ("transformers", ("transformers",)),
    ("numpy", ("numpy",)),
    ("ray", ("ray",)),
    ("pyarrow", ("pyarrow",)),
    ("pillow", ("pillow",)),
]

# What TensorRT-LLM releases pin (their wheel's requirements); other versions break at import
# or at model load. Keyed by release prefix.
TRTLLM_PINS: dict[str, dict[str, str]] = {
    "1.2.": {"transformers": "==4.57.3", "numpy": "<2"},
}
TRTLLM_PYTHONS = ("3.10", "3.12")  # the Python versions TensorRT-LLM wheels are built for

HF_HINT = REGISTRY["hf"].install_hint
TRTLLM_HINT = (
    "use NVIDIA's TensorRT-LLM release container (nvcr.io/nvidia/tensorrt-llm/release), "
    "or `pip install tensorrt_llm` on a Linux machine with CUDA"
)
GPU_HINT = "no NVIDIA GPU visible (torch.cuda and nvidia-smi found none)"

# TensorRT-LLM hands each request's pixel_values (float32: 4 patches of 14x14x3x2 values a
# vision token) to its worker through /dev/shm; the trtllm engine's defaults keep
# 2 x max_batch_size (128) requests inside per actor, one actor per GPU.
SHM_BYTES_PER_VISION_TOKEN = 4 * 1176 * 4
DEFAULT_INFLIGHT = 128
DEFAULT_VISION_TOKENS = 1280  # image.max_pixels' default: 1280 tiles of 28x28


@dataclass
class Gpu:
    name: str
    memory_mib: int | None
    source: str  # "torch" | "nvidia-smi"


@dataclass
class GpuReport:
    """What torch and nvidia-smi say about CUDA and GPUs (each part None when not asked)."""

    torch_cuda: str | None = None  # CUDA version torch was built with
    cuda_available: bool | None = None
    driver: str | None = None
    gpus: list[Gpu] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def version_of(*dists: str) -> str | None:
    """Installed version of the first of ``dists`` that is installed, else None."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:  # broken metadata counts as not installed
            continue
    return None


def package_versions() -> dict[str, str | None]:
    """Label -> version (None = missing). qvl-batch run from a plain clone has no metadata."""
    versions = {label: version_of(*dists) for label, dists in PACKAGES}
    versions["qvl-batch"] = versions["qvl-batch"] or f"{__version__} (not installed)"
    return versions


def torch_cuda(report: GpuReport) -> bool:
    """Fill ``report`` from torch.cuda; False when torch cannot be imported."""
    try:
        import torch
    except Exception as exc:
        report.notes.append(f"torch failed to import: {type(exc).__name__}: {exc}")
        return False
    report.torch_cuda = getattr(torch.version, "cuda", None)
    try:
        report.cuda_available = bool(torch.cuda.is_available())
        count = torch.cuda.device_count() if report.cuda_available else 0
        for i in range(count):
            props = torch.cuda.get_device_properties(i)
            report.gpus.append(Gpu(props.name, props.total_memory // 2**20, "torch"))
    except Exception as exc:  # a broken driver shows up here
        report.notes.append(f"torch.cuda failed: {type(exc).__name__}: {exc}")
    return True


def nvidia_smi(report: GpuReport, list_gpus: bool) -> None:
    """Driver version (and GPUs, if ``list_gpus``) from nvidia-smi when it is on PATH."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return
    query = "--query-gpu=name,memory.total,driver_version"
    try:
        proc = subprocess.run(
            [exe, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        report.notes.append(f"nvidia-smi failed: {exc}")
        return
    if proc.returncode != 0:
        first = (proc.stdout + proc.stderr).strip().splitlines()[:1]
        report.notes.append(f"nvidia-smi failed: {first[0] if first else proc.returncode}")
        return
    for line in proc.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        name, memory, driver = parts[0], parts[1], parts[2]
        report.driver = driver
        if list_gpus:
            mib = memory.split()[0]
            report.gpus.append(Gpu(name, int(mib) if mib.isdigit() else None, "nvidia-smi"))


def gpu_report(torch_installed: bool) -> GpuReport:
    """GPUs via torch.cuda when torch imports, else via nvidia-smi; driver from nvidia-smi."""
    report = GpuReport()
    via_torch = torch_installed and torch_cuda(report)
    nvidia_smi(report, list_gpus=not report.gpus)
    if not via_torch and not report.gpus and shutil.which("nvidia-smi") is None:
        report.notes.append("neither torch nor nvidia-smi available to list GPUs")
    return report


def _major(version: str) -> int | None:
    head = version.split(".")[0]
    return int(head) if head.isdigit() else None


def _meets(version: str, spec: str) -> bool:
    """The two spec forms TRTLLM_PINS uses: '==X.Y.Z' and '<N' (major version)."""
    if spec.startswith("=="):
        return version.split("+")[0] == spec[2:]
    if spec.startswith("<"):
        major = _major(version)
        return major is not None and major < int(spec[1:])
    raise ValueError(f"unsupported spec {spec!r}")


def compatibility_warnings(versions: dict[str, str | None]) -> list[str]:
    """Known-incompatible combinations among the installed packages."""
    trt = versions.get("tensorrt_llm")
    if not trt:
        return []
    warnings = []
    for prefix, pins in TRTLLM_PINS.items():
        if not trt.startswith(prefix):
            continue
        for package, spec in pins.items():
            found = versions.get(package)
            if found and not _meets(found, spec):
                warnings.append(
                    f"tensorrt_llm {trt} wants {package}{spec}, found {package} {found}: "
                    f"`pip install '{package}{spec}'` (or use the release container as shipped)"
                )
    return warnings


def engine_status(versions: dict[str, str | None], gpus: GpuReport) -> dict[str, str]:
    """Engine name -> 'OK' or 'MISSING: ... -- hint'."""
    status = {"fake": "OK"}
    hf_missing = [p for p in ("torch", "transformers") if not versions.get(p)]
    status["hf"] = f"MISSING: {', '.join(hf_missing)} -- {HF_HINT}" if hf_missing else "OK"
    problems = []
    if not versions.get("tensorrt_llm"):
        hint = TRTLLM_HINT
        py = ".".join(platform.python_version_tuple()[:2])
        if py not in TRTLLM_PYTHONS:
            hint += f"; its wheels are for Python {' and '.join(TRTLLM_PYTHONS)}, this is {py}"
        problems.append(f"tensorrt_llm -- {hint}")
    if not gpus.gpus:
        problems.append(f"GPU -- {GPU_HINT}")
    status["trtllm"] = "MISSING: " + "; ".join(problems) if problems else "OK"
    return status


def shm_lines(free_bytes: int | None, actors: int) -> list[str]:
    """Free /dev/shm against what the trtllm engine's in-flight requests need on this node."""
    need = DEFAULT_INFLIGHT * DEFAULT_VISION_TOKENS * SHM_BYTES_PER_VISION_TOKEN * max(1, actors)
    if free_bytes is None:
        return ["  /dev/shm not found (TensorRT-LLM passes images to its worker through it)"]
    line = (
        f"  /dev/shm free {free_bytes / 2**30:.1f} GiB; trtllm needs about {need / 2**30:.1f} GiB "
        f"({DEFAULT_INFLIGHT} requests inside x {DEFAULT_VISION_TOKENS}-token images x "
        f"{max(1, actors)} actor(s))"
    )
    if free_bytes >= need:
        return [line + ": OK"]
    return [
        line + ": TOO SMALL",
        "  raise it: docker run --shm-size=<size> or --ipc=host (Kubernetes: an emptyDir with "
        "medium Memory on /dev/shm), or lower engine.trtllm.max_inflight_requests / "
        "image.max_pixels",
    ]


def free_shm() -> int | None:
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def report_lines(versions: dict[str, str | None], gpus: GpuReport) -> list[str]:
    """The whole report as text lines."""
    lines = ["Packages"]
    lines.append(f"  {'python':<14}{platform.python_version()} ({sys.executable})")
    lines += [f"  {label:<14}{version or 'missing'}" for label, version in versions.items()]
    lines.append("CUDA / GPUs")
    if gpus.torch_cuda is not None or gpus.cuda_available is not None:
        available = "yes" if gpus.cuda_available else "no"
        lines.append(
            f"  torch CUDA    {gpus.torch_cuda or 'none (CPU build)'}, available: {available}"
        )
    if gpus.driver:
        lines.append(f"  driver        {gpus.driver}")
    for i, gpu in enumerate(gpus.gpus):
        memory = f"{gpu.memory_mib} MiB" if gpu.memory_mib is not None else "memory unknown"
        lines.append(f"  GPU {i:<10}{gpu.name}, {memory} (via {gpu.source})")
    if not gpus.gpus:
        lines.append("  no GPUs found")
    lines += [f"  note: {note}" for note in gpus.notes]
    lines.append("Shared memory")
    lines += shm_lines(free_shm(), len(gpus.gpus))
    lines.append("Engines")
    lines += [f"  {name:<14}{state}" for name, state in engine_status(versions, gpus).items()]
    lines.append("Compatibility")
    warnings = compatibility_warnings(versions)
    lines += [f"  WARNING: {w}" for w in warnings] or ["  OK: no known-incompatible versions"]
    return lines


def run_doctor() -> int:
    """Print the report; always 0 (it diagnoses, it does not gate)."""
    versions = package_versions()
    gpus = gpu_report(torch_installed=versions.get("torch") is not None)
    print("\n".join(report_lines(versions, gpus)))
    return 0
