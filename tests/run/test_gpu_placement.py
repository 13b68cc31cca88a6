"""One actor per GPU on a multi-GPU node, checked on a local Ray that declares 4 GPUs.

No GPU exists here: Ray only counts the declared ones and hands each actor its own id (it sets
CUDA_VISIBLE_DEVICES from it), which is the placement being tested; the fake engine stands in
for a model. A real multi-GPU run is issue 8's, on a machine with several GPUs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from qvl_batch.errors import Exit
from qvl_batch.output.state import METRICS_FILE
from qvl_batch.tooling.synth import SynthSpec, make_dataset

from ..conftest import write_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_one_actor_per_declared_gpu_each_with_its_own_device(tmp_path):
    data = tmp_path / "data"
    make_dataset(str(data), SynthSpec(rows=96, shards=2, row_group_rows=8, max_side=96))
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", data, out, None)
    overrides = [
        "cluster.address=null",  # a local Ray of its own, declaring 4 GPUs
        "cluster.local_num_cpus=4",
        "cluster.local_num_gpus=4",
        "cluster.num_actors=0",  # one per GPU
        "cluster.num_gpus_per_actor=1",
        "batching.unit_rows=8",
    ]
    # In a process of its own: this test process stays connected to the session's Ray.
    cmd = [sys.executable, "-m", "qvl_batch.cli", "run", str(job), *overrides, "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == Exit.OK, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(r"4 actors ready \(.*\); GPUs \d \| \d \| \d \| \d$", proc.stderr, re.M)
    actors = json.loads((out / METRICS_FILE).read_text())["actors"]
    assert len(actors) == 4
    gpu_ids = [a["gpu_ids"] for a in actors]
    assert sorted(gpu_ids) == [["0"], ["1"], ["2"], ["3"]], gpu_ids
    for actor in actors:  # the engine process sees only its own GPU
        assert actor["cuda_visible_devices"] == actor["gpu_ids"][0]
    assert len({a["pid"] for a in actors}) == 4
