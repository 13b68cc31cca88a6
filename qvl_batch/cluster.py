"""Ray: join or start a cluster, size the actor pool, start/replace actors, classify failures."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    RayActorError,
    RayTaskError,
)

from .actor import UnitWorker
from .bucketing import PaddingStats
from .config import Config
from .storage import merge_request_stats

log = logging.getLogger("qvl_batch")

ACTOR_DEATH = (RayActorError, ActorDiedError, ActorUnavailableError)
STATS_TIMEOUT_S = 10


class ClusterError(RuntimeError):
    """The cluster cannot run this job (no room for an actor, engine failed to load)."""


@dataclass
class Outcome:
    table: Any = None
    error: str | None = None
    actor_died: bool = False


def connect(cfg: Config) -> bool:
    """Join ``cluster.address`` or start a local Ray; returns True if this call started it."""
    if ray.is_initialized():
        return False
    common = {"include_dashboard": False, "logging_level": logging.WARNING}
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, **common)
    else:
        c = cfg.cluster
        ray.init(num_cpus=c.local_num_cpus or None, num_gpus=c.local_num_gpus or None, **common)
    return True


def actor_layout(cfg: Config, resources: dict[str, float]) -> tuple[int, dict[str, Any]]:
    """(number of actors, ray options per actor): one per GPU, else by CPUs."""
    c = cfg.cluster
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    per_actor = c.num_gpus_per_actor
    if cfg.engine.name == "trtllm":
        # A tensor-parallel engine spans tensor_parallel_size GPUs of one node; an actor's
        # resource request is placed on one node, and Ray sets CUDA_VISIBLE_DEVICES to them.
        per_actor = max(per_actor, cfg.engine.trtllm.tensor_parallel_size)
    if gpus > 0 and per_actor > 0:
        capacity = int(gpus // per_actor)
        options = {"num_gpus": per_actor, "num_cpus": c.cpus_per_actor}
        what = f"{gpus:g} GPUs at {per_actor:g} per actor"
    else:
        capacity = int(cpus // c.cpus_per_actor)
        options = {"num_cpus": c.cpus_per_actor}
        what = f"{cpus:g} CPUs at {c.cpus_per_actor:g} per actor (no GPUs)"
    if capacity < 1:
        raise ClusterError(f"the cluster has room for no actor: {what}")
    n = c.num_actors or capacity
    if n > capacity:
        log.warning("cluster.num_actors=%d but the cluster fits %d (%s)", n, capacity, what)
        n = capacity
    # process_unit calls for the window, plus room for ready()/stats() calls.
    options["max_concurrency"] = cfg.batching.units_in_flight_per_actor + 2
    options["max_restarts"] = 0  # the driver replaces dead actors and re-queues their units
    return n, options


class FlightRecorder:
    """What each actor has inside its engine right now, kept outside the actors.

    A worker notes rows as they enter its engine (in groups, waiting for the note) and the
    rows that came back since its last note (no wait of their own). When an actor process
    dies, the driver reads what it had inside: those are the rows that may have killed it.
    One plain (single-threaded) Ray actor, so notes from one worker are applied in the order
    they were sent.
    """

    def __init__(self) -> None:
        self._inside: dict[int, set] = {}

    def note(self, incarnation: int, entering: list, left: list) -> None:
        inside = self._inside.setdefault(incarnation, set())
        inside.difference_update(tuple(k) for k in left)
        inside.update(tuple(k) for k in entering)
        if not inside:
            del self._inside[incarnation]

    def last(self, incarnation: int) -> list | None:
        inside = self._inside.pop(incarnation, None)
        return sorted(inside) if inside else None


class ActorPool:
    """The job's actors. Starts Ray if needed; shuts down what it started."""

    def __init__(self, cfg: Config, reuse=None):
        self.cfg = cfg
        self._started_ray = connect(cfg)
        # The reuse index goes to the object store once; every actor maps the same copy.
        self._reuse = ray.put(reuse) if reuse is not None else None
        self.size, self.options = actor_layout(cfg, ray.cluster_resources())
        self._remote = ray.remote(UnitWorker).options(**self.options)
        # num_cpus=0: bookkeeping only; it must never wait for room the workers hold.
        self.recorder = ray.remote(FlightRecorder).options(num_cpus=0, max_restarts=-1).remote()
        self.incarnations = 0  # actors started so far; an actor's number is its incarnation
        self.actors = [self._new_actor() for _ in range(self.size)]
        self.incarnation_of = list(range(self.size))  # slot -> incarnation of its actor
        try:
            infos = ray.get([a.ready.remote() for a in self.actors])
        except (RayTaskError, *ACTOR_DEATH) as exc:
            self.shutdown()
            raise ClusterError(f"engine failed to start: {_first_line(exc)}") from None
        self.engine_name = infos[0]["engine"]
        self.engine_version = infos[0]["engine_version"]
        # Where each actor runs (pid, node, the GPUs Ray gave it): kept in _metrics.json.
        self.placement = [
            {k: info.get(k) for k in ("pid", "node_id", "gpu_ids", "cuda_visible_devices")}
            for info in infos
        ]
        gpus = [",".join(info.get("gpu_ids") or []) for info in infos]
        log.info(
            "%d actors ready (%s %s, %s)%s",
            self.size,
            self.engine_name,
            self.engine_version,
            ", ".join(f"{k}={v}" for k, v in self.options.items()),
            f"; GPUs {' | '.join(gpus)}" if any(gpus) else "",
        )
        self._stats: dict[int, dict] = {}

    def _new_actor(self):
        actor = self._remote.remote(self.cfg, self.incarnations, self.recorder, self._reuse)
        self.incarnations += 1
        return actor

    def crash_batch(self, index: int) -> list[tuple[str, int]] | None:
        """The (unit id, row index) keys actor ``index`` had in its engine when it died."""
        try:
            keys = ray.get(
                self.recorder.last.remote(self.incarnation_of[index]), timeout=STATS_TIMEOUT_S
            )
        except (GetTimeoutError, RayTaskError, *ACTOR_DEATH):
            return None
        return [tuple(k) for k in keys] if keys else None

    def replace(self, index: int):
        """Kill actor ``index`` (if still alive) and start a fresh one in its place."""
        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:
            pass
        log.warning("actor %d died; starting a replacement", index)
        self.incarnation_of[index] = self.incarnations
        self.actors[index] = self._new_actor()
        return self.actors[index]

    @staticmethod
    def wait(refs: list, timeout: float) -> list:
        """Refs that are done: blocks until the first one (or ``timeout``), then takes the rest
        that are already done, so a finished unit is committed and replaced at once."""
        ready, rest = ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=True)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=True)
            ready += more
        return ready

    @staticmethod
    def get(ref) -> Outcome:
        try:
            return Outcome(table=ray.get(ref))
        except ACTOR_DEATH as exc:
            return Outcome(error=_first_line(exc), actor_died=True)
        except RayTaskError as exc:
            return Outcome(error=_first_line(exc))

    def collect_stats(self) -> tuple[PaddingStats, dict[str, float], dict]:
        """Padding, stage timings and storage retries summed over the live actors; the
        timings also carry ``peak_rss_mib``, the largest actor's peak memory."""
        padding, timings, storage = PaddingStats(), {}, {}
        refs = [a.stats.remote() for a in self.actors]
        for ref in refs:
            try:
                stats = ray.get(ref, timeout=STATS_TIMEOUT_S)
            except (GetTimeoutError, RayTaskError, *ACTOR_DEATH):
                continue
            padding.merge(stats["padding"])
            storage = merge_request_stats(storage, stats["storage"])
            for k, v in stats["timings"].items():
                timings[k] = round(timings.get(k, 0.0) + v, 3)
            peak = max(timings.get("peak_rss_mib", 0.0), stats.get("peak_rss_mib", 0.0))
            timings["peak_rss_mib"] = peak
        return padding, timings, storage

    def shutdown(self) -> None:
        for actor in [*self.actors, self.recorder]:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        if self._started_ray:
            ray.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    tail = [ln for ln in text if ln.strip()][-1:] if text else []
    return f"{type(exc).__name__}: {tail[0] if tail else ''}"
