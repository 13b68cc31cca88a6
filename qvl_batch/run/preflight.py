"""Pre-flight: what a job needs, checked on the driver before Ray starts and before
``_job.json`` is written, so a first run that cannot work stops in seconds with one line saying
what to fix (exit 2), not after actors fail to start or every row fails alone.

Checked: the model (a local folder with config.json, a Hugging Face id in the local cache, or
an fsspec URL that exists), the engine's packages (looked up, not imported), the fsspec backends
of the image URIs in the first rows, and an output folder that holds someone else's files.
Joining a Ray cluster (``cluster.address``), the model folder and the engine's packages live on
the actors' hosts, which may differ from this one: there a problem is a warning, not a refusal.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import posixpath
import re
from pathlib import Path

import fsspec

from ..config import Config
from ..engines import REGISTRY
from ..errors import ConfigError, InputError
from ..output.state import DATA_DIR, ERRORS_DIR, JOB_FILE, OWN_FILES, OutputState
from ..rows.manifest import Plan
from ..rows.reader import read_unit_table
from ..storage import Storage, describe

log = logging.getLogger("qvl_batch")

URI_SAMPLE = 32  # image values of the first shard's first row group whose protocols are checked
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name
# pip packages behind fsspec's common protocols (fsspec's own message names them too)
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs"}
BACKENDS.update({"abfs": "adlfs", "abfss": "adlfs", "http": "aiohttp", "https": "aiohttp"})


def preflight(cfg: Config, plan: Plan, state: OutputState, storage: Storage) -> str:
    """Run every check (raising ConfigError / InputError on the first problem); log and
    return the one-line summary."""
    parts = [
        check_model(cfg, storage),
        check_engine_packages(cfg),
        check_image_uris(cfg, plan, storage),
        check_output(state, cfg.output.mode),
    ]
    line = "pre-flight: " + ", ".join(p for p in parts if p)
    log.info(line)
    return line


def _refuse_or_warn(cfg: Config, problem: str, what: str) -> str:
    """A refusal on a local Ray; joining a cluster, a warning (the actors' hosts decide)."""
    if not cfg.cluster.address:
        raise ConfigError(problem)
    log.warning("pre-flight: %s (on this host; the cluster's nodes may differ)", problem)
    return f"{what} not seen here"


def hf_cache_dir() -> Path:
    """huggingface_hub's cache folder, from the same variables it reads (no import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(home).expanduser() / "hub"


def check_model(cfg: Config, storage: Storage) -> str:
    """engine.model is a model folder, a cached Hugging Face id or a URL that exists."""
    model = cfg.engine.model
    if cfg.engine.name == "fake":
        return ""
    if "://" in model and not model.startswith("file://"):
        return _check_model_url(model, storage)
    path = Path(model.removeprefix("file://")).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"engine.model: {model} has no config.json: not a model folder (give the folder "
                "that holds config.json and the weights)"
            )
        return "model ok"
    if path.exists():
        raise ConfigError(f"engine.model: {model} is a file; give the model's folder")
    if HF_ID.match(model):
        cache = hf_cache_dir()
        if (cache / f"models--{model.replace('/', '--')}").is_dir():
            return "model in the Hugging Face cache"
        problem = (
            f"engine.model: {model!r} is no local folder and not in the Hugging Face cache "
            f"({cache}; HF_HOME / HF_HUB_CACHE move it); jobs do not download models: run "
            f"`huggingface-cli download {model}` first, or set engine.model to a model folder"
        )
    else:
        problem = (
            f"engine.model: folder {path.absolute()} does not exist; set engine.model to a model "
            "folder (with its config.json) or a Hugging Face id (org/name) in the local cache"
        )
    return _refuse_or_warn(cfg, problem, "model")


def _check_model_url(model: str, storage: Storage) -> str:
    try:
        fs, path = storage.fs(model)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"engine.model: {model}: cannot open it here: {exc}") from None
    config = posixpath.join(path.rstrip("/"), "config.json")
    try:
        found = storage.call(f"stat {config}", fs.exists, config)
    except Exception as exc:  # credentials, network: the actors may do better; they decide
        log.warning("pre-flight: engine.model %s not checked: %s", model, describe(exc))
        return "model not checked"
    if not found:
        raise ConfigError(
            f"engine.model: {model} holds no config.json (no such folder?); give the URL of "
            "the folder that holds config.json and the weights"
        )
    return "model ok"


def _findable(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def check_engine_packages(cfg: Config) -> str:
    """The engine's packages can be found (looked up, not imported: torch takes seconds)."""
    entry = REGISTRY[cfg.engine.name]
    missing = [p for p in entry.packages if not _findable(p)]
    if not entry.packages:
        return ""
    if not missing:
        return "engine packages ok"
    problem = (
        f"engine.name={entry.name} needs {' and '.join(missing)}, not installed here: "
        f"{entry.install_hint}"
    )
    return _refuse_or_warn(cfg, problem, "engine packages")


def _sample_uris(cfg: Config, plan: Plan, storage: Storage, kind: str) -> list[str] | None:
    """Up to URI_SAMPLE image URIs of the first unit (read as actors read it, any input
    format); None if it cannot be read."""
    try:
        unit = next(plan.units(), None)
        if unit is None:
            return []
        table = read_unit_table(unit, cfg, storage)
    except Exception as exc:  # the plan read fine: the actors will say what is wrong
        log.warning(
            "pre-flight: image URIs of %s not checked: %s", plan.shards[0].url, describe(exc)
        )
        return None
    values = table.column(cfg.input.image_column).slice(0, URI_SAMPLE).to_pylist()
    if kind == "path":
        values = [v.get("path") if isinstance(v, dict) else None for v in values]
    return [v for v in values if isinstance(v, str) and v]


def check_image_uris(cfg: Config, plan: Plan, storage: Storage) -> str:
    """A URI column's protocols have their fsspec backend here (s3fs, gcsfs, aiohttp, ...);
    without one every row would be a FETCH_ERROR."""
    column, kind = cfg.input.image_column, plan.image_kind
    summary = f"image column {column!r} {kind}"
    # A struct with bytes reads them where present; its paths (file names, mostly) not sampled.
    if kind not in ("uri", "path") or not plan.shards:
        return summary
    uris = _sample_uris(cfg, plan, storage, kind)
    if uris is None:
        return summary + " (URIs not checked)"
    protocols: dict[str, str] = {}
    for uri in uris:
        protocols.setdefault(fsspec.core.split_protocol(uri)[0] or "file", uri)
    for proto, example in sorted(protocols.items()):
        try:
            fsspec.get_filesystem_class(proto)
        except ImportError as exc:
            package = BACKENDS.get(proto)
            hint = f"pip install {package}" if package else "install the fsspec backend it names"
            raise ConfigError(
                f"input.image_column {column!r} holds {proto}:// URIs (e.g. {example}) and "
                f"this Python cannot open them: {exc}. {hint}"
            ) from None
        except ValueError:
            raise InputError(
                f"input.image_column {column!r} holds URIs of protocol {proto!r} (e.g. "
                f"{example}), which fsspec does not know; fix the column's URIs"
            ) from None
    return summary + f" ({', '.join(sorted(protocols)) or 'no URIs in the first rows'})"


def check_output(state: OutputState, mode: str) -> str:
    """The output is new, empty, or a qvl-batch output; a folder of someone else's files is
    refused even with output.mode=overwrite, which would delete its data/ and errors/."""
    names = state.entries()
    if not names:
        return "output new"
    if JOB_FILE in names:
        return f"output holds a job ({mode})"
    foreign = sorted(set(names) - OWN_FILES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ConfigError(
            f"output.path {state.url} holds files and no {JOB_FILE} ({shown}): not a qvl-batch "
            "output. Choose an empty or new folder; --fresh (output.mode=overwrite) does not "
            f"apply here: it deletes a job's {DATA_DIR}/ and {ERRORS_DIR}/, which this folder "
            "may hold for another purpose"
        )
    if mode != "overwrite":
        raise ConfigError(
            f"output.path {state.url} holds qvl-batch files but no {JOB_FILE} (an earlier "
            "--fresh start cut short?): run with --fresh to start over there, or choose a new "
            "folder"
        )
    return "output overwritten"
