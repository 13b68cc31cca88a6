"""Ray: join or start a cluster, size the actor pool, start/replace actors, classify failures."""

from __future__ import annotations

import logging
import os
import signal
import threading
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

from ..config import Config
from ..engines import gpus_spanned
from ..engines.bucketing import PaddingStats
from ..errors import ClusterError
from ..storage import merge_request_stats
from .actor import UnitWorker
from .handout import Outcome
from .liveness import Beat, silence_limit
from .recorder import FlightRecorder

log = logging.getLogger("qvl_batch")

ACTOR_DEATH = (RayActorError, ActorDiedError, ActorUnavailableError)
STATS_TIMEOUT_S = 10


def connect(cfg: Config) -> bool:
    """Join ``cluster.address`` or start a local Ray; returns True if this call started it."""
    if ray.is_initialized():
        return False
    # ray_logs off: Ray's log lines below ERROR and the workers' output stay off this terminal
    # (they stay in Ray's session logs); the actors' own messages come via the recorder.
    loud = cfg.cluster.ray_logs
    common = {
        "include_dashboard": False,
        "logging_level": logging.WARNING if loud else logging.ERROR,
        "log_to_driver": loud,
    }
    # ray.init installs its own SIGTERM handler (sys.exit mid-call, then a C++ abort at exit):
    # a handler the command installed (cli.py: SIGTERM as Ctrl-C) is put back after it.
    on_term = signal.getsignal(signal.SIGTERM) if _main_thread() else None
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, **common)
    else:
        c = cfg.cluster
        ray.init(num_cpus=c.local_num_cpus or None, num_gpus=c.local_num_gpus or None, **common)
    if callable(on_term):
        signal.signal(signal.SIGTERM, on_term)
    return True


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def actor_layout(cfg: Config, resources: dict[str, float]) -> tuple[int, dict[str, Any]]:
    """(number of actors, ray options per actor): one per GPU, else by CPUs."""
    c = cfg.cluster
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    per_actor = c.num_gpus_per_actor
    # A tensor-parallel engine spans several GPUs of one node; an actor's resource request is
    # placed on one node, and Ray sets CUDA_VISIBLE_DEVICES to them.
    per_actor = max(per_actor, gpus_spanned(cfg))
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
    # process_unit calls for the window, plus room for ready()/stats()/withdraw() calls.
    options["max_concurrency"] = cfg.batching.units_in_flight_per_actor + 3
    options["max_restarts"] = 0  # the driver replaces dead actors and re-queues their units
    return n, options


@dataclass
class Start:
    """How one actor's start ended: ready, or the reason it is not."""

    index: int
    ready: bool = False
    error: str | None = None
    # The engine's constructor raised (bad model path, missing package, out of memory at load),
    # as opposed to the process dying (killed, preempted, its node lost).
    init_failed: bool = False


class ActorPool:
    """The job's actors, one per slot. Starts Ray if needed; shuts down what it started.

    Starting is elastic: every slot's actor is created at once and each reports ``ready()`` in
    its own time; the driver waits for those refs (:meth:`starting`) next to its units' and
    hands work to the slots that are :attr:`live`. A slot whose actor dies or fails to start is
    started again (:meth:`replace`); an actor that cannot be placed yet (GPUs busy, nodes still
    being added) simply stays pending until Ray places it.
    """

    def __init__(self, cfg: Config, reuse=None, job_id: str | None = None):
        self.cfg = cfg
        self._started_ray = connect(cfg)
        # The reuse index goes to the object store once; every actor maps the same copy.
        self._reuse = ray.put(reuse) if reuse is not None else None
        self.size, self.options = actor_layout(cfg, ray.cluster_resources())
        options = dict(self.options)
        if job_id:  # lets operators (and the chaos test) tell this job's actor processes apart
            options["runtime_env"] = {"env_vars": {"QVL_JOB_ID": job_id}}
        self._remote = ray.remote(UnitWorker).options(**options)
        # num_cpus=0: bookkeeping only; it must never wait for room the workers hold.
        self.recorder = ray.remote(FlightRecorder).options(num_cpus=0, max_restarts=-1).remote()
        self.incarnations = 0  # actors started so far; an actor's number is its incarnation
        self.actors: list = [None] * self.size
        self.incarnation_of = [0] * self.size  # slot -> incarnation of its actor
        self._slot_of: dict[int, int] = {}  # incarnation -> slot, for the relayed messages
        self.live = [False] * self.size
        self.init_failures = [0] * self.size  # consecutive constructor failures per slot
        self._starting: dict = {}  # ready() ref -> slot
        self.engine_name: str | None = None
        self.can_move = True  # withdraw takes back a unit its actor has not started
        self.timelines: list[dict] = []  # filled by collect_stats
        self.engine_version: str | None = None
        # Where each slot's actor first ran (pid, node, the GPUs Ray gave it): in _metrics.json.
        self.placement: list[dict | None] = [None] * self.size
        self._gpus = [""] * self.size  # each slot's GPU ids, for the all-ready line
        self._process: list[tuple[str, int] | None] = [None] * self.size  # (node id, pid) now
        self._all_ready_logged = False
        for index in range(self.size):
            self._start(index)

    def _start(self, index: int) -> None:
        actor = self._remote.remote(self.cfg, self.incarnations, self.recorder, self._reuse)
        self.actors[index] = actor
        self.incarnation_of[index] = self.incarnations
        self._slot_of[self.incarnations] = index
        self.incarnations += 1
        self.live[index] = False
        self._starting[actor.ready.remote()] = index

    def starting(self) -> list:
        """The ``ready()`` refs of actors still starting (wait on them with the units')."""
        return list(self._starting)

    def is_start(self, ref) -> bool:
        return ref in self._starting

    def started(self, ref) -> Start:
        """The outcome of a finished ``ready()`` ref; a ready actor's slot becomes live."""
        index = self._starting.pop(ref)
        try:
            info = ray.get(ref)
        except ACTOR_DEATH as exc:
            self.relay()  # what it said before it died, ahead of the driver's line on it
            init_failed = bool(getattr(exc, "actor_init_failed", False))
            if init_failed:
                self.init_failures[index] += 1
            return Start(index, error=_last_line(exc), init_failed=init_failed)
        except RayTaskError as exc:  # ready() itself raised: treat as a failed start
            self.relay()
            self.init_failures[index] += 1
            return Start(index, error=_last_line(exc), init_failed=True)
        self.live[index] = True
        self.init_failures[index] = 0
        self._process[index] = (info.get("node_id"), info.get("pid"))
        if self.engine_name is None:
            self.engine_name, self.engine_version = info["engine"], info["engine_version"]
        if self.placement[index] is None:
            keys = (
                "pid",
                "node_id",
                "gpu_ids",
                "cuda_visible_devices",
                "visible_gpus",
                "engine_modes",
            )
            self.placement[index] = {k: info.get(k) for k in keys}
        gpus = ",".join(info.get("gpu_ids") or [])
        self._gpus[index] = gpus
        log.info(
            "actor %d ready (%s %s, pid %s%s); %d of %d live",
            index,
            info["engine"],
            info["engine_version"],
            info.get("pid"),
            f", GPUs {gpus}" if gpus else "",
            sum(self.live),
            self.size,
        )
        if all(self.live) and not self._all_ready_logged:
            self._all_ready_logged = True
            log.info(
                "%d actors ready (%s %s, %s)%s",
                self.size,
                self.engine_name,
                self.engine_version,
                ", ".join(f"{k}={v}" for k, v in self.options.items()),
                f"; GPUs {' | '.join(self._gpus)}" if any(self._gpus) else "",
            )
        return Start(index, ready=True)

    def relay(self) -> None:
        """Log what the actors said (their warnings and errors, recorder.RelayHandler) as the
        driver's own lines, naming the actor's slot."""
        if self.cfg.cluster.ray_logs:  # Ray forwards the actors' output itself
            return
        try:
            said = ray.get(self.recorder.news.remote(), timeout=STATS_TIMEOUT_S)
        except (GetTimeoutError, RayTaskError, *ACTOR_DEATH):
            return
        for incarnation, level, text in said:
            log.log(level, "actor %s: %s", self._slot_of.get(incarnation, "?"), text)

    def retire(self, index: int) -> None:
        """Give up on a slot (its engine cannot start there): kill what is left of it."""
        self.live[index] = False
        self._starting = {r: i for r, i in self._starting.items() if i != index}
        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:
            pass

    def crash_batch(self, index: int) -> tuple[list[tuple[str, int]] | None, bool]:
        """(the (unit id, row index) keys actor ``index`` had in its engine when it died,
        whether its engine had stalled)."""
        try:
            keys, stalled = ray.get(
                self.recorder.last.remote(self.incarnation_of[index]), timeout=STATS_TIMEOUT_S
            )
        except (GetTimeoutError, RayTaskError, *ACTOR_DEATH):
            return None, False
        return ([tuple(k) for k in keys] if keys else None), stalled

    def health(self) -> dict[int, Beat] | None:
        """Each live slot's last heartbeat (slots that sent none are left out); None if the
        recorder did not answer."""
        self.relay()
        slots = [i for i, live in enumerate(self.live) if live]
        try:
            beats = ray.get(
                self.recorder.health.remote([self.incarnation_of[i] for i in slots]),
                timeout=STATS_TIMEOUT_S,
            )
        except (GetTimeoutError, RayTaskError, *ACTOR_DEATH):
            return None
        by_incarnation = {self.incarnation_of[i]: i for i in slots}
        return {by_incarnation[inc]: beat for inc, beat in beats.items()}

    def kill_silent(self, index: int, beat: Beat | None) -> None:
        """Kill slot ``index``'s actor, wedged as a whole process (no heartbeat): its rows are
        judged as a stall. Its calls then fail as after a death, and the driver replaces it."""
        stall_s = self.cfg.limits.stall_s
        log.error(
            "actor %d sent no heartbeat for %s (over %.0f s: limits.stall_s=%g); killing it, "
            "its rows run alone next",
            index,
            f"{beat.age_s:.0f} s" if beat else "its whole start",
            silence_limit(stall_s),
            stall_s,
        )
        try:
            ray.get(
                self.recorder.stalled.remote(self.incarnation_of[index]), timeout=STATS_TIMEOUT_S
            )
        except (GetTimeoutError, RayTaskError, *ACTOR_DEATH):
            pass
        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:
            pass
        # A stopped or wedged process cannot act on Ray's request to exit: on this node, the
        # signal that needs no cooperation.
        node, pid = self._process[index] or (None, None)
        if pid and node == ray.get_runtime_context().get_node_id() and _is_worker(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def replace(self, index: int):
        """Kill actor ``index`` (if still alive) and start a fresh one in its place."""
        self.relay()  # its last words (an engine that died, a stall) before the driver's
        self.retire(index)
        log.warning("actor %d is gone; starting a replacement", index)
        self._start(index)
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
            return Outcome(error=_last_line(exc), actor_died=True)
        except RayTaskError as exc:
            return Outcome(error=_last_line(exc))

    def withdraw(self, index: int, unit_id: str) -> bool:
        """Take back a unit slot ``index`` holds but has not started (a move); True if so."""
        try:
            ref = self.actors[index].withdraw.remote(unit_id, True)
            return bool(ray.get(ref, timeout=STATS_TIMEOUT_S))
        except (GetTimeoutError, RayTaskError, *ACTOR_DEATH):
            return False

    def drop(self, index: int, unit_id: str) -> None:
        """Stop slot ``index`` working on a unit whose result is no longer wanted (no wait)."""
        try:
            self.actors[index].withdraw.remote(unit_id, False)
        except Exception:  # a dead actor has nothing to drop
            pass

    def collect_stats(self) -> tuple[PaddingStats, dict[str, float], dict]:
        """Padding, stage timings and storage retries summed over the live actors; the
        timings also carry ``peak_rss_mib``, the largest actor's peak memory. Each live
        slot's timeline (busy / waiting / idle over wall time) is kept in :attr:`timelines`."""
        padding, timings, storage = PaddingStats(), {}, {}
        self.timelines: list[dict] = []
        slots = [i for i, live in enumerate(self.live) if live]
        refs = [self.actors[i].stats.remote() for i in slots]
        for index, ref in zip(slots, refs):
            try:
                stats = ray.get(ref, timeout=STATS_TIMEOUT_S)
            except (GetTimeoutError, RayTaskError, *ACTOR_DEATH):
                continue
            if "timeline" in stats:
                self.timelines.append(
                    {
                        "actor": index,
                        "incarnation": stats.get("incarnation"),
                        "gpus": self._gpus[index],
                        **stats["timeline"],
                    }
                )
            padding.merge(stats["padding"])
            storage = merge_request_stats(storage, stats["storage"])
            for k, v in stats["timings"].items():
                timings[k] = round(timings.get(k, 0.0) + v, 3)
            peak = max(timings.get("peak_rss_mib", 0.0), stats.get("peak_rss_mib", 0.0))
            timings["peak_rss_mib"] = peak
        return padding, timings, storage

    def shutdown(self) -> None:
        self.relay()
        for actor in [*self.actors, self.recorder]:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        if self._started_ray:
            ray.shutdown()


def _is_worker(pid: int) -> bool:
    """Is ``pid`` still one of our actor processes (Ray titles them ``ray::UnitWorker...``)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"UnitWorker" in f.read()
    except OSError:
        return False


def _last_line(exc: BaseException) -> str:
    """The exception's type and the last non-empty line of its text (Ray puts the cause, after
    the remote traceback, at the end)."""
    text = str(exc).strip().splitlines()
    tail = [ln for ln in text if ln.strip()][-1:] if text else []
    return f"{type(exc).__name__}: {tail[0] if tail else ''}"
