"""``qvl-batch``: run a job, make the demo, benchmark. Exit codes are documented in the README.

Commands import what they need when they run: ``status``, ``verify``, ``doctor`` and ``plan``
never load Ray (tests/test_imports.py checks it)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from .errors import Exit, QvlError, Terminated, exit_for
from .run.validate import load_job

log = logging.getLogger("qvl_batch")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.fresh:
        overrides.append("output.mode=overwrite")
    if args.verbose:  # Ray's own logs and the actors' output too
        overrides.append("cluster.ray_logs=true")
    from .run.driver import run_job

    cfg = load_job(args.job, overrides)
    summary = run_job(cfg, progress_bar=None if not args.no_progress else False)
    for line in summary.lines():
        print(line)
    return summary.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    from .commands.demo import run_demo

    return run_demo(args.data, args.output, args.rows, args.shards, list(args.overrides))


def cmd_make_test_model(args: argparse.Namespace) -> int:
    from .tooling.modelgen import make_test_model

    path = make_test_model(args.out, size=args.size, seed=args.seed)
    print(f"wrote a random-weight Qwen2.5-VL ({args.size}) to {path}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .commands.doctor import run_doctor

    return run_doctor()


# Commands that run a job: SIGTERM (Ray's `jobs cancel`, Kubernetes, systemd, `kill`) takes
# Ctrl-C's clean path there; the others keep Python's default (die at once).
JOB_COMMANDS = ("run", "demo", "retry-failed")


def _on_sigterm(signum, frame) -> None:
    """SIGTERM in a job command: raised once as :class:`Terminated` in the main thread, so the
    run unwinds as after Ctrl-C (actors stopped, lease released); later ones (a supervisor
    repeating itself) are ignored while that clean-up runs."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def _catch_sigterm(command: str) -> None:
    if command in JOB_COMMANDS and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _sigterm_caught(command: str) -> bool:
    return command in JOB_COMMANDS and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qvl-batch", description="Offline batch inference for Qwen2.5-VL over Parquet."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run or resume a job")
    run.add_argument("job", help="job YAML file (see jobs/)")
    run.add_argument("overrides", nargs="*", help="section.key=value overrides")
    run.add_argument("--fresh", action="store_true", help="discard earlier results in the output")
    run.add_argument("--no-progress", action="store_true", help="plain progress lines, no bar")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="make a synthetic dataset and run the demo job on it")
    demo.add_argument("--data", default="demo-data", help="where the synthetic shards go")
    demo.add_argument("--output", default="demo-output", help="where results go")
    demo.add_argument("--rows", type=int, default=2000)
    demo.add_argument("--shards", type=int, default=4)
    demo.add_argument("overrides", nargs="*", help="section.key=value overrides")
    demo.set_defaults(func=cmd_demo)

    mk = sub.add_parser("make-test-model", help="build a random-weight Qwen2.5-VL checkpoint")
    mk.add_argument("out", help="output model directory")
    mk.add_argument("--size", choices=["tiny", "3b", "7b"], default="tiny")
    mk.add_argument("--seed", type=int, default=0)
    mk.set_defaults(func=cmd_make_test_model)

    doctor = sub.add_parser("doctor", help="report engine, CUDA and GPU versions; what is missing")
    doctor.set_defaults(func=cmd_doctor)

    from .commands.plan import add_plan_parser
    from .commands.retry import add_retry_parser
    from .commands.status import add_status_parser
    from .commands.submit import add_submit_parser
    from .commands.verify import add_verify_parser

    add_plan_parser(sub)
    add_status_parser(sub)
    add_verify_parser(sub)
    add_retry_parser(sub)
    add_submit_parser(sub)

    from .bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    _catch_sigterm(args.command)
    try:
        return args.func(args)
    except QvlError as exc:
        code = exit_for(exc)
        what = "refused" if code == Exit.REFUSED else "error"
        print(f"qvl-batch: {what}: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt as exc:
        # Ray's waits re-raise a KeyboardInterrupt of their own: the handler having fired (it
        # leaves SIGTERM ignored) tells a SIGTERM from a Ctrl-C as well.
        fired = _sigterm_caught(args.command)
        terminated = isinstance(exc, Terminated) or fired
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"qvl-batch: {what}; committed units are kept, run again to resume", file=sys.stderr)
        return Exit.TERMINATED if terminated else Exit.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
