"""Actor layout (cluster.py): one actor per GPU, CPU fallback, tensor parallel, capped by the
cluster."""

from __future__ import annotations

import pytest

from qvl_batch.run.validate import load_job

from ..conftest import write_job


def test_actor_layout_one_per_gpu_cpu_fallback_and_tensor_parallel(tmp_path, dataset):
    from qvl_batch.run.cluster import ClusterError, actor_layout

    job = write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None)

    def layout(resources, *ov):
        return actor_layout(load_job(job, ["cluster.num_actors=0", *ov]), resources)

    n, opts = layout({"GPU": 8, "CPU": 64})
    assert n == 8 and opts["num_gpus"] == 1
    n, opts = layout({"CPU": 6}, "cluster.cpus_per_actor=2")
    assert n == 3 and "num_gpus" not in opts and opts["num_cpus"] == 2
    n, opts = layout(
        {"GPU": 8, "CPU": 64},
        "engine.name=trtllm",
        "engine.model=m",
        "engine.trtllm.tensor_parallel_size=2",
    )
    assert n == 4 and opts["num_gpus"] == 2
    n, _ = layout({"GPU": 2, "CPU": 64}, "cluster.num_actors=5")
    assert n == 2, "capped at what the cluster fits"
    with pytest.raises(ClusterError, match="room for no actor"):
        layout(
            {"GPU": 1, "CPU": 8},
            "engine.name=trtllm",
            "engine.model=m",
            "engine.trtllm.tensor_parallel_size=2",
        )
