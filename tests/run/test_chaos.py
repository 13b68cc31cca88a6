"""Chaos, the short run CI keeps (``qvl-batch bench chaos`` runs it as long as you like): SIGKILL
this job's actors (while loading and while working) and its driver (also while a unit is being
committed) at random moments, resume each time; in the end ``verify`` passes and the output
equals an uninterrupted run's. Only this job's processes are killed: its actors are found by
the job id they carry, never by a process title other jobs share."""

from __future__ import annotations

import json

import pytest

from qvl_batch.bench.chaos import bench_chaos
from qvl_batch.cli import build_parser

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KILLS = 12


def test_random_kills_of_actors_and_driver_lose_and_duplicate_nothing(tmp_path, ray_head, capsys):
    out = tmp_path / "chaos.json"
    argv = ["bench", "chaos", "--workdir", str(tmp_path), "--address", ray_head]
    argv += ["--kills", str(KILLS), "--runs", "1", "--seed", "20261125", "--rows", "480"]
    args = build_parser().parse_args([*argv, "--json-out", str(out)])
    code = bench_chaos(args)
    (run,) = json.loads(out.read_text())["runs"]
    logs = (tmp_path / "chaos-1.log").read_text(errors="replace")
    assert code == 0 and run["exit"] == 0, (run, logs[-4000:])
    assert run["verify_ok"] and run["equal_to_uninterrupted"], (run, logs[-4000:])
    assert run["kills"] == KILLS, ("the job finished before the chaos did: slow it down", run)
    phases = run["by_phase"]
    assert phases["startup"] >= 1 and phases["actor"] >= 2, run
    assert phases["driver"] + phases["commit"] >= 3, run
    assert run["drivers"] == phases["driver"] + phases["commit"] + 1
    assert "kills" in capsys.readouterr().out
