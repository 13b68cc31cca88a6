"""GPU busy fraction and memory, sampled in the background while a benchmark runs."""

from __future__ import annotations

import datetime as dt
import shutil
import signal
import subprocess
import threading
import time

GPU_SAMPLE_MS = 200


class GpuSampler:
    """Every GPU's busy % and memory every 200 ms in the background: pynvml, else nvidia-smi.

    ``utilization.gpu`` is the share of the sample period in which any kernel ran: a busy
    fraction, not SM occupancy.
    """

    def __init__(self, interval_ms: int = GPU_SAMPLE_MS):
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, int, float, float]] = []  # (time, gpu, util %, MiB)
        self.memory_total_mib: dict[int, float] = {}  # each GPU's memory, for the peak's share
        self.source: str | None = None
        self.note = ""
        self._proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Start sampling; False (with ``note`` set) when neither pynvml nor nvidia-smi works."""
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
        except Exception:
            pynvml = None
        if pynvml is not None:
            self.source = "pynvml"
            self._thread = threading.Thread(target=self._poll_nvml, args=(pynvml,), daemon=True)
        elif shutil.which("nvidia-smi"):
            # Each line carries nvidia-smi's own timestamp: a pipe may deliver lines in bursts.
            cmd = [
                "nvidia-smi",
                "--query-gpu=timestamp,index,utilization.gpu,memory.used,memory.total",
                "--format=csv,noheader,nounits",
                "-lms",
                str(self.interval_ms),
            ]
            if shutil.which("stdbuf"):
                cmd = ["stdbuf", "-oL", *cmd]
            self._proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            self.source = "nvidia-smi"
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        else:
            self.note = "no GPU sampling: neither pynvml nor nvidia-smi is available"
            return False
        self._thread.start()
        return True

    def _read_smi(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._parse_smi(line)

    def _parse_smi(self, line: str) -> None:
        parts = [p.strip() for p in line.split(",")]
        try:
            when = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            gpu, util, mem = int(parts[1]), float(parts[2]), float(parts[3])
        except (ValueError, IndexError):  # "[N/A]" or a partial line
            return
        self.samples.append((when, gpu, util, mem))
        try:
            self.memory_total_mib[gpu] = float(parts[4])
        except (ValueError, IndexError):
            pass

    def _poll_nvml(self, pynvml) -> None:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        while not self._stop.wait(self.interval_ms / 1000):
            now = time.time()
            for i, h in enumerate(handles):
                util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
                info = pynvml.nvmlDeviceGetMemoryInfo(h)
                self.samples.append((now, i, float(util), info.used / 2**20))
                self.memory_total_mib[i] = info.total / 2**20
        pynvml.nvmlShutdown()

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.send_signal(signal.SIGINT)  # its loop ends on Ctrl+C, output flushed
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self, t0: float, t1: float) -> dict:
        """Mean busy fraction of the busiest GPU (the actor's) over wall-clock [t0, t1]."""
        if self.source is None:
            return {"note": self.note}
        window = [s for s in self.samples if t0 <= s[0] <= t1]
        by_gpu: dict[int, list[float]] = {}
        for _, gpu, util, _ in window:
            by_gpu.setdefault(gpu, []).append(util)
        if not by_gpu:
            return {"source": self.source, "note": "no samples in the steady window"}
        busiest = max(by_gpu, key=lambda g: sum(by_gpu[g]) / len(by_gpu[g]))
        utils = by_gpu[busiest]
        return {
            "source": self.source,
            "gpu_index": busiest,
            "busy_fraction_mean": round(sum(utils) / len(utils) / 100, 4),
            "samples": len(utils),
            # over every sample of that GPU, not only the window: start-up's peak counts
            "memory_used_peak_mib": max(m for _, g, _, m in self.samples if g == busiest),
            "memory_total_mib": self.memory_total_mib.get(busiest),
            "busy_by_gpu": {g: round(sum(u) / len(u) / 100, 4) for g, u in sorted(by_gpu.items())},
        }
