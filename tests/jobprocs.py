"""Finding one job's processes on a shared machine (the chaos benchmark's helpers): its actors
carry ``QVL_JOB_ID``, so a test kills only what its own job started."""

from __future__ import annotations

from qvl_batch.bench.chaos import job_actors, job_id_of, start_driver

__all__ = ["job_actors", "job_id_of", "start_driver"]
