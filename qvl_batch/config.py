"""Structured job configuration: dataclass schemas, loading and the checks of each section.

Merge order (later wins): schema defaults -> conf/defaults.yaml -> conf groups named in the job
file's ``defaults:`` list -> the job file -> ``key=value`` overrides from the command line.
Unknown keys and bad values raise :class:`ConfigError` naming the key and what is allowed, before
any work starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")
_NODE_REF = re.compile(r"\.?[A-Za-z_][\w]*(\.[A-Za-z_][\w]*|\[\d+\])*")


def check(cond: bool, key: str, message: str) -> None:
    """A setting's check: a ConfigError that names the key."""
    if not cond:
        raise ConfigError(f"{key}: {message}")


@dataclass
class JobConfig:
    """Who the job is: its name shows in logs, the report and every output row's lineage."""

    name: str = "qvl-batch-job"


# What input.paths hold (rows/formats.py reads each); auto decides by extension and content.
INPUT_FORMATS = ("auto", "parquet", "images", "csv", "jsonl", "webdataset", "openai-batch")


@dataclass
class InputConfig:
    """Where rows come from and which columns mean what."""

    # fsspec URLs, folders or globs: Parquet shards, image files, CSV/JSONL manifests,
    # WebDataset tar shards or OpenAI Batch files (input.format)
    paths: list[str] = field(default_factory=list)
    # a text file (one URL/glob per line) or a JSON list of them; a .csv/.jsonl manifest of
    # images is read as an input itself
    manifest: str | None = None
    format: str = "auto"
    id_column: str | None = "id"  # None: ids are derived as "<shard-name>:<row>"
    image_column: str = "image"  # binary bytes, {bytes, path} struct, or a URI string
    prompt_column: str | None = None  # per-row prompt; else prompt.template is used
    passthrough_columns: list[str] = field(default_factory=list)
    storage_options: dict[str, Any] = field(default_factory=dict)  # raw fsspec kwargs

    def __post_init__(self) -> None:
        check(bool(self.image_column), "input.image_column", "must name a column")
        check(self.format in INPUT_FORMATS, "input.format", f"must be one of {INPUT_FORMATS}")

    def check_required(self) -> None:
        """Checked on the resolved config only (the schema's own defaults have no input)."""
        check(
            bool(self.paths) or bool(self.manifest),
            "input.paths",
            "no input: set input.paths (Parquet URLs or globs) or input.manifest",
        )


@dataclass
class PromptConfig:
    """The user prompt: a fixed text, or a template with ``{column}`` fields filled per row."""

    template: str = "Describe this image."
    system: str | None = None  # None: the model template's default system text; "": none
    # Longer prompts (text tokens, chat template included) are PROMPT_TOO_LONG rows; prompts
    # over CHARS_PER_TOKEN_CAP x this many characters are refused before tokenizing.
    max_prompt_tokens: int = 4096

    def __post_init__(self) -> None:
        check(self.max_prompt_tokens >= 1, "prompt.max_prompt_tokens", "must be >= 1")


# Source formats decoded by default (Pillow's names): what photo and web datasets hold. MPO is
# multi-picture JPEG (phones, 3D cameras); AVIF is decoded by Pillow itself from 11.3. Pillow reads
# ~40 more, each plugin more attack surface, so the rest are refused (UNSUPPORTED_FORMAT) unless
# listed in image.formats. HEIF (phones' HEIC) needs the heif extra.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


@dataclass
class ImageConfig:
    """Decoding and resizing to the Qwen2.5-VL grid (sides multiples of 28)."""

    min_pixels: int = 56 * 56  # Qwen2.5-VL processor default (3136)
    max_pixels: int = 28 * 28 * 1280  # Qwen2.5-VL processor default (1003520)
    max_image_pixels: int = 100_000_000  # decompression-bomb guard on the *source* image
    min_side: int = 8  # smaller sources are refused (IMAGE_TOO_SMALL)
    draft: bool = True  # JPEG DCT-domain downscale when the target is <= half the source
    # Source formats decoded, Pillow's names (upper case); others are UNSUPPORTED_FORMAT rows.
    formats: list[str] = field(default_factory=lambda: list(IMAGE_FORMATS))

    def __post_init__(self) -> None:
        check(self.min_pixels >= 28 * 28, "image.min_pixels", "must be >= 784 (one 28x28 tile)")
        check(
            self.max_pixels >= self.min_pixels,
            "image.max_pixels",
            f"must be >= image.min_pixels ({self.min_pixels})",
        )
        check(self.max_image_pixels > 0, "image.max_image_pixels", "must be > 0")
        check(self.min_side >= 1, "image.min_side", "must be >= 1")
        self._check_formats()

    def _check_formats(self) -> None:
        # Whether Pillow decodes each format here: run/validate.py (it needs rows/images).
        self.formats = list(dict.fromkeys(str(name).upper() for name in self.formats))
        check(bool(self.formats), "image.formats", "must name at least one source format")
        # Checked here, at config load, not at first use: a job that cannot decode HEIF stops
        # before any work with the install hint, instead of starting actors that fail every row.
        # find_spec only looks the package up; it is imported where images are decoded.
        check(
            "HEIF" not in self.formats or importlib.util.find_spec("pillow_heif") is not None,
            "image.formats",
            "HEIF needs pillow-heif, which is not installed: pip install 'qvl-batch[heif]'",
        )


@dataclass
class BatchingConfig:
    """How rows become engine batches inside an actor."""

    max_batch_size: int = 32
    # Group rows by resized image size (less padding); false batches in arrival order.
    bucketing: bool = True
    # vision + text (+ max output) tokens per batch; bounds activation / KV memory per batch.
    max_tokens_per_batch: int = 65536
    # A bucket that is not full is topped up with rows of the sizes nearest in tokens while
    # the batch's padding stays within this fraction (0 = exact-size batches only).
    max_padding_fraction: float = 0.1
    # A bucket that is not full is flushed once its oldest row waited this long, so no row
    # waits forever behind a size that is rare in the data.
    max_wait_s: float = 2.0
    # Units an actor holds at once. They run in turn (handout.py): the first runs, the next are
    # read and decoded ahead, so two keep the engine fed; more widen the rows bucketing picks
    # from but hold more decoded images in memory, and sit queued where a move must fetch them.
    units_in_flight_per_actor: int = 2
    # Rows an actor keeps prepared (decoded, resized) for the engine, in batches of
    # max_batch_size: the window bucketing chooses from. Wider fills more same-size batches
    # and holds more decoded images in memory. Rows in flight (units_in_flight_per_actor x
    # unit_rows) must exceed it for the window to fill.
    window_batches: int = 8
    unit_rows: int = 512  # target rows per work unit (row groups are grouped up to this)
    # A small job's units are cut smaller so each actor gets about this many (rows / (this x
    # actors), at least 16 rows): 202 rows on 2 actors are 4 units, not one unit that one actor
    # runs while the other idles (docs/PERFORMANCE.md, "A first run"). 0: units of unit_rows
    # whatever the job's size.
    min_units_per_actor: int = 2
    # At the tail of a job (nothing left to hand out), an idle actor runs a copy of a unit that
    # another actor still runs; the first complete result commits, the other is dropped.
    backup_copies: bool = True
    prepare_threads: int = 0  # image decode threads per actor; 0 = the actor's CPU count

    def __post_init__(self) -> None:
        check(self.max_batch_size >= 1, "batching.max_batch_size", "must be >= 1")
        check(self.max_tokens_per_batch >= 1, "batching.max_tokens_per_batch", "must be >= 1")
        check(self.max_wait_s >= 0, "batching.max_wait_s", "must be >= 0")
        check(self.window_batches >= 1, "batching.window_batches", "must be >= 1")
        check(
            0 <= self.max_padding_fraction < 1, "batching.max_padding_fraction", "must be in [0, 1)"
        )
        check(
            self.units_in_flight_per_actor >= 1,
            "batching.units_in_flight_per_actor",
            "must be >= 1",
        )
        check(self.unit_rows >= 1, "batching.unit_rows", "must be >= 1")
        check(self.min_units_per_actor >= 0, "batching.min_units_per_actor", "must be >= 0")
        check(self.prepare_threads >= 0, "batching.prepare_threads", "must be >= 0")


DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class BenchmarkKnobs:
    """Engine knobs for benchmarks on random-weight models (which never emit EOS); not for jobs."""

    # The hf engine ends each row's answer at a length drawn from its id: fixed:N | uniform:LO:HI
    # | lognormal:MEAN:CAP (engines/lengths.py). A batch still decodes until its longest row
    # ends. "" = off: the model decides.
    answer_lengths: str = ""


@dataclass
class EngineConfig:
    """Which engine runs the model; engine-specific knobs pass through ``options``."""

    name: str = "fake"
    # hf: a model directory, local or an fsspec URL (copied to local disk first); trtllm: a
    # local model directory (its config.json and tokenizer are read before the LLM loads)
    model: str = "fake://qwen2.5-vl"
    dtype: str = "auto"
    device: str = "auto"  # hf: auto | cpu | cuda
    # One throwaway batch when an actor starts (hf), as part of start-up (like loading the
    # model), so the first real batch does not pay kernel selection and allocator growth.
    warmup: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # passed through to the engine
    # Each engine's own settings: a mapping here, its engine's dataclass once validated
    # (run/validate.py, through the registry: engines.settings_of).
    fake: Any = field(default_factory=dict)
    hf: Any = field(default_factory=dict)
    trtllm: Any = field(default_factory=dict)
    benchmark: BenchmarkKnobs = field(default_factory=BenchmarkKnobs)

    def __post_init__(self) -> None:
        check(self.dtype in DTYPES, "engine.dtype", f"{self.dtype!r} is not one of {DTYPES}")
        check(bool(self.model), "engine.model", "must name a model")


@dataclass
class SamplingConfig:
    """Decoding settings; temperature 0 means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.max_tokens >= 1, "sampling.max_tokens", "must be >= 1")
        check(self.temperature >= 0, "sampling.temperature", "must be >= 0")
        check(0 < self.top_p <= 1, "sampling.top_p", "must be in (0, 1]")
        check(self.top_k >= 0, "sampling.top_k", "must be >= 0 (0 = off)")


@dataclass
class StorageConfig:
    """Object storage for every URL the job touches (inputs, image URIs, outputs).

    Credentials come from each backend's standard chain (environment, shared files, instance
    roles); a job file should not hold them. ``input.storage_options`` and
    ``output.storage_options`` pass raw fsspec arguments per side on top of these.
    """

    endpoint_url: str | None = None  # an S3-compatible endpoint (MinIO, Ceph, a local server)
    region: str | None = None  # S3 region
    anon: bool = False  # public buckets, no credentials
    profile: str | None = None  # S3: a named profile from the AWS config files
    # Retries for transient errors (5xx, throttling, timeouts, dropped connections) on every
    # read, list and write: exponential backoff from backoff_s, capped, with jitter.
    max_attempts: int = 6
    backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        check(self.max_attempts >= 1, "storage.max_attempts", "must be >= 1")
        check(self.backoff_s >= 0, "storage.backoff_s", "must be >= 0")
        check(self.max_backoff_s >= self.backoff_s, "storage.max_backoff_s", ">= backoff_s")
        check(self.connect_timeout_s > 0, "storage.connect_timeout_s", "must be > 0")
        check(self.read_timeout_s > 0, "storage.read_timeout_s", "must be > 0")


GUIDED_MODES = ("auto", "required", "off")


@dataclass
class StructuredConfig:
    """Structured output: the model answers in JSON matching ``json_schema``.

    Each top-level property becomes a typed Parquet column in data/ (string, integer -> int64,
    number -> float64, boolean, arrays -> lists, objects -> structs). Output that is not valid
    JSON or does not match the schema is an OUTPUT_PARSE_ERROR row.
    """

    json_schema: dict[str, Any] | None = None  # a JSON Schema (draft 2020-12), type: object
    # auto: guided decoding where the engine has it (TensorRT-LLM, transformers + xgrammar);
    # required: refuse to start on an engine without it; off: free generation, parsed after.
    guided: str = "auto"

    def __post_init__(self) -> None:
        if self.guided in ("False", "false"):  # YAML reads an unquoted `off` as false
            self.guided = "off"
        check(
            self.guided in GUIDED_MODES,
            "structured.guided",
            f"{self.guided!r} is not one of {GUIDED_MODES}",
        )


@dataclass
class ReuseConfig:
    """Incremental runs: carry over results from earlier outputs instead of recomputing.

    A row is carried over when an earlier output holds a data row with the same result key:
    the image content hash, the prompt (system and rendered template), the model and engine,
    and the sampling, image and structured-output settings.
    """

    outputs: list[str] = field(default_factory=list)  # earlier job outputs (any fsspec URL)
    # A listed path that holds no job output: "error" stops before any work; "skip" warns and
    # goes on without it (a nightly job naming yesterday's output, on its first night).
    if_missing: str = "error"

    def __post_init__(self) -> None:
        modes = ("error", "skip")
        check(self.if_missing in modes, "reuse.if_missing", f"must be one of {modes}")


OUTPUT_MODES = ("resume", "overwrite")


@dataclass
class OutputConfig:
    """Where results go. ``resume`` continues a matching earlier run; ``overwrite`` starts over."""

    path: str = MISSING
    mode: str = "resume"
    storage_options: dict[str, Any] = field(default_factory=dict)
    compression: str = "zstd"
    # openai-batch: also batch_output.jsonl and batch_errors.jsonl in the Batch API's shapes
    format: str = "parquet"

    def __post_init__(self) -> None:
        check(self.mode in OUTPUT_MODES, "output.mode", f"{self.mode!r} not in {OUTPUT_MODES}")
        formats = ("parquet", "openai-batch")
        check(self.format in formats, "output.format", f"{self.format!r} not in {formats}")


@dataclass
class ClusterConfig:
    """Ray: join ``address`` or start a local cluster; how many actors and what each reserves."""

    address: str | None = None  # None starts a local Ray; "auto" or "ray://..." joins one
    num_actors: int = 0  # 0 = one per GPU, or (no GPUs) CPUs // cpus_per_actor
    num_gpus_per_actor: float = 1.0  # used only when the cluster has GPUs
    cpus_per_actor: float = 1.0
    local_num_cpus: int = 0  # CPUs a local Ray may use; 0 = all
    local_num_gpus: int = 0  # GPUs a local Ray offers; 0 = those it detects
    # Work starts with the first ready actor and late ones join; the job gives up if fewer
    # than min_actors are live for start_timeout_s (from its start, or from losing actors).
    min_actors: int = 1
    start_timeout_s: float = 1800.0  # model loads, image pulls and autoscaled nodes take minutes
    # Ray's own output on this terminal: its log lines and every actor's stdout/stderr (stack
    # dumps included). Off, the actors' own warnings and errors still come back, one line each,
    # through the driver's log. `qvl-batch -v run` turns it on.
    ray_logs: bool = False

    def __post_init__(self) -> None:
        check(self.num_actors >= 0, "cluster.num_actors", "must be >= 0 (0 = auto)")
        check(self.min_actors >= 1, "cluster.min_actors", "must be >= 1")
        check(self.start_timeout_s > 0, "cluster.start_timeout_s", "must be > 0")
        check(self.cpus_per_actor > 0, "cluster.cpus_per_actor", "must be > 0")
        check(self.local_num_gpus >= 0, "cluster.local_num_gpus", "must be >= 0 (0 = detect)")


@dataclass
class LimitsConfig:
    """When to give up: per-unit retries and the error fraction that fails a job."""

    max_unit_attempts: int = 3
    max_error_fraction: float = 0.1
    # Errors are judged only after this many rows, so a few early bad rows do not fail a job.
    min_rows_for_error_check: int = 1000
    # Actor deaths a job tolerates in all. A row that kills its actor is isolated (it runs
    # alone, and after two deaths alone becomes an ENGINE_CRASH row): about three deaths each.
    max_actor_restarts: int = 50
    max_row_crashes: int = 2  # deaths while a row runs alone that make it an ENGINE_CRASH row
    # An engine holding rows that gives no result for this long is declared dead: its actor
    # exits and is replaced, and its rows run alone (a row that stalls every engine alone ends
    # as ENGINE_STALL). Results, not batch time, are watched; the default is far above a healthy
    # batch's seconds (7B, B=128, 300-token answers: ~15 s on an H100) and a decode graph's
    # compile (tens of seconds).
    stall_s: float = 300.0

    def __post_init__(self) -> None:
        check(self.max_unit_attempts >= 1, "limits.max_unit_attempts", "must be >= 1")
        check(self.max_actor_restarts >= 0, "limits.max_actor_restarts", "must be >= 0")
        check(self.max_row_crashes >= 1, "limits.max_row_crashes", "must be >= 1")
        check(self.stall_s > 0, "limits.stall_s", "must be > 0 seconds")
        check(
            0 <= self.max_error_fraction <= 1,
            "limits.max_error_fraction",
            "must be in [0, 1]",
        )


@dataclass
class Config:
    """A whole job."""

    job: JobConfig = field(default_factory=JobConfig)
    input: InputConfig = field(default_factory=InputConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    reuse: ReuseConfig = field(default_factory=ReuseConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)


def conf_dir() -> Path:
    """The defaults folder: inside an installed wheel, or the repo's top-level conf/."""
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "conf"


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = (getattr(exc, "msg", None) or str(exc)).strip().splitlines()[0]
    if "not in struct" in str(exc) or ("Key '" in str(exc) and "not in" in str(exc)):
        section = key.rsplit(".", 1)[0] if "." in key else ""
        allowed = _allowed_keys(section)
        return ConfigError(f"{source}: unknown key '{key}'. Allowed here: {', '.join(allowed)}")
    return ConfigError(f"{source}: bad value for '{key}': {msg}")


def _allowed_keys(section: str) -> list[str]:
    node: Any = Config
    for part in filter(None, section.split(".")):
        types = {f.name: f.type for f in dataclasses.fields(node)}
        default = {f.name: f.default_factory for f in dataclasses.fields(node)}  # type: ignore
        if part not in types:
            return []
        node = type(default[part]())  # type: ignore[misc]
    return sorted(f.name for f in dataclasses.fields(node))


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _explain(exc, source) from None


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry line numbers
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: must be a mapping of sections (job, input, engine, ...)")
    return loaded


def _check_interpolations(merged: DictConfig) -> None:
    """Only ``${section.key}`` references: no resolvers (``${oc.env:...}`` and the like).

    A job file is data. Resolvers could read the environment (credentials) into a config that
    is saved next to the output and stamped on every row; values belong in the file or on the
    command line instead.
    """

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")
        elif isinstance(node, str) and "${" in node:
            for ref in _INTERPOLATION.findall(node):
                if ":" in ref or not _NODE_REF.fullmatch(ref.strip()):
                    raise ConfigError(
                        f"{key}: '${{{ref}}}' is not allowed: job files may reference other "
                        "keys (${section.key}) but not call resolvers; put the value in the "
                        "file or pass key=value on the command line"
                    )

    walk(OmegaConf.to_container(merged, resolve=False), "")


def load_config(job_file: str | Path | dict | None, overrides: list[str] | None = None) -> Config:
    """Resolve a job: defaults, conf groups, the job file (or a dict of its contents: the
    Python API) and CLI overrides, then validate."""
    schema = OmegaConf.structured(Config)
    merged = _merge(schema, _load_yaml(conf_dir() / "defaults.yaml"), "conf/defaults.yaml")
    if isinstance(job_file, dict):
        job = OmegaConf.create(job_file)
        job_file = "the job dict"
    elif job_file is not None:
        job = _load_yaml(Path(job_file))
    if job_file is not None:
        groups = job.pop("defaults", [])
        for group in groups or []:
            group_path = conf_dir() / f"{group}.yaml"
            if not group_path.is_file():
                known = sorted(
                    str(p.relative_to(conf_dir()).with_suffix(""))
                    for p in conf_dir().rglob("*.yaml")
                    if p.name != "defaults.yaml"
                )
                raise ConfigError(
                    f"{job_file}: defaults entry '{group}' not found; known groups: {known}"
                )
            merged = _merge(merged, _load_yaml(group_path), f"conf/{group}.yaml")
        merged = _merge(merged, job, str(job_file))
    return _resolve(merged, overrides)


def config_from_saved(saved: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """A Config from a saved ``_job.json`` config (and ``key=value`` overrides), validated like
    a job file."""
    schema = OmegaConf.structured(Config)
    return _resolve(_merge(schema, OmegaConf.create(saved), "the saved config"), overrides)


def _resolve(merged: DictConfig, overrides: list[str] | None) -> Config:
    """Apply ``key=value`` overrides, then validate into a Config."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        try:
            dotlist = OmegaConf.from_dotlist([item])
        except Exception as exc:
            raise ConfigError(f"override '{item}': {exc}") from None
        merged = _merge(merged, dotlist, f"override '{item}'")
    _check_interpolations(merged)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"required keys not set: {', '.join(missing)}")
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]  # runs __post_init__
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
        raise (ConfigError(str(cause)) if cause else _explain(exc, "config")) from None
    cfg.input.check_required()
    return cfg


# "org/name": what a model hub id looks like; a relative engine.model of this shape that is no
# local path is left as it is (made absolute it would name a folder that does not exist).
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def local_absolute(path: str, base: str | None = None) -> str:
    """A relative local path made absolute (against ``base``, else the current directory);
    URLs (a scheme) and absolute paths as they are. Globs keep their wildcards."""
    if not path or "://" in path:
        return path
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.abspath(os.path.join(base or os.getcwd(), path))


def model_absolute(model: str, base: str | None = None) -> str:
    """:func:`local_absolute` for ``engine.model``, except a hub-id-like name (``org/name``)
    that is no local path."""
    hub_like = "://" not in model and _HUB_ID.fullmatch(model)
    if hub_like and not os.path.exists(os.path.join(base or os.getcwd(), model)):
        return model
    return local_absolute(model, base)


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its local paths absolute (input paths and manifest, the model, earlier
    outputs to reuse): what is saved in ``_job.json`` and fingerprinted must not depend on the
    directory a command runs from, and actors may run elsewhere."""
    inp = dataclasses.replace(
        cfg.input,
        paths=[local_absolute(p) for p in cfg.input.paths],
        manifest=local_absolute(cfg.input.manifest) if cfg.input.manifest else None,
    )
    engine = dataclasses.replace(cfg.engine, model=model_absolute(cfg.engine.model))
    reuse = dataclasses.replace(cfg.reuse, outputs=[local_absolute(p) for p in cfg.reuse.outputs])
    return dataclasses.replace(cfg, input=inp, engine=engine, reuse=reuse)
