"""How many rows a work unit gets: ``batching.unit_rows``, lowered for a small job so every
actor gets units, and kept for a resumed job (its unit ids depend on it)."""

from __future__ import annotations

from ..config import Config

# A small job's units are cut smaller so each expected actor gets about min_units_per_actor,
# never below this: a unit costs a commit (two part files and a marker) whatever its size.
MIN_UNIT_ROWS = 16
# Actors expected when the config does not say (cluster.num_actors=0 on a cluster Ray has not
# been asked about yet): a guess; more units than actors cost a commit each, fewer idle actors.
ACTORS_GUESS = 8


def expected_actors(cfg: Config) -> int:
    """Actors the job expects before Ray is asked: cluster.num_actors, a local Ray's declared
    GPUs, else :data:`ACTORS_GUESS`."""
    c = cfg.cluster
    if c.num_actors:
        return c.num_actors
    if not c.address and c.local_num_gpus and c.num_gpus_per_actor > 0:
        return max(1, int(c.local_num_gpus // c.num_gpus_per_actor))
    return ACTORS_GUESS


def sized_unit_rows(cfg: Config, total_rows: int) -> int:
    """batching.unit_rows, lowered for a small job so each expected actor gets about
    batching.min_units_per_actor units (202 rows on 2 actors: 4 units of 51, not one of 202
    run by one actor while the other runs a backup copy), never below MIN_UNIT_ROWS."""
    target, per = cfg.batching.unit_rows, cfg.batching.min_units_per_actor
    if not per or total_rows <= 0:
        return target
    cap = -(-total_rows // (per * expected_actors(cfg)))
    return min(target, max(cap, MIN_UNIT_ROWS))


def job_unit_rows(job: dict, cfg: Config) -> int:
    """The unit size a job's output was planned with: ``_job.json``'s ``unit_rows``, or
    batching.unit_rows for outputs written before it was recorded (they were cut at that)."""
    return int(job.get("unit_rows") or cfg.batching.unit_rows)
