"""What decides a job's outputs (output/fingerprint.py): outputs count, speed knobs do not."""

from __future__ import annotations

from qvl_batch.output.fingerprint import fingerprint, fingerprint_fields
from qvl_batch.run.validate import load_job

from ..conftest import write_job


def test_fingerprint_covers_outputs_not_performance_knobs(tmp_path, dataset):
    job = write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None)

    def fp(*ov):
        return fingerprint(fingerprint_fields(load_job(job, list(ov)), "input-fp"))

    base = fp()
    assert fp("batching.max_batch_size=2", "cluster.num_actors=1") == base
    assert fp("engine.fake.batch_latency_s=1") == base
    assert fp("prompt.template=Other") != base
    assert fp("sampling.max_tokens=9") != base
    assert fp("image.max_pixels=200000") != base


def test_benchmark_answer_lengths_are_in_the_fingerprint_only_when_set(tmp_path, dataset):
    job = write_job(tmp_path / "j.yaml", dataset, tmp_path / "o", None)
    base = ["engine.name=hf", "engine.model=m"]

    def fields(*ov):
        return fingerprint_fields(load_job(job, [*base, *ov]), "input-fp")

    speed = ("engine.hf.compile=true", "engine.hf.vision=stock", "engine.hf.static_cache_gib=2")
    assert fields() == fields(*speed)  # speed only
    assert "answer_lengths" not in fields()["engine"]
    lengths = fields("engine.benchmark.answer_lengths=fixed:8")["engine"]["answer_lengths"]
    assert lengths == "fixed:8"
