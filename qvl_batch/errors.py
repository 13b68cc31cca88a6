"""The project's vocabulary of failure, in one light module (no Ray, no torch, no pyarrow):
the row error codes of ``errors/`` with what each means, the process exit codes, and the
exceptions commands catch to turn into them.

No other module spells an error code as a string: it names a :class:`RowError` member (a
``str``, so it is written, compared and counted as its plain name). ``tests/test_errors.py``
checks that, and that the README's tables say what this module says.
"""

from __future__ import annotations

from enum import Enum, IntEnum


class RowError(str, Enum):
    """Why a row is in ``errors/`` (its ``error_code``); each one's meaning: :data:`MEANINGS`."""

    MISSING_IMAGE = "MISSING_IMAGE"
    DECODE_ERROR = "DECODE_ERROR"
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"
    IMAGE_TOO_SMALL = "IMAGE_TOO_SMALL"
    ASPECT_RATIO = "ASPECT_RATIO"
    FETCH_ERROR = "FETCH_ERROR"
    BAD_PROMPT = "BAD_PROMPT"
    MISSING_ID = "MISSING_ID"
    PROMPT_TOO_LONG = "PROMPT_TOO_LONG"
    ENGINE_ERROR = "ENGINE_ERROR"
    ENGINE_TIMEOUT = "ENGINE_TIMEOUT"
    ENGINE_CRASH = "ENGINE_CRASH"
    ENGINE_STALL = "ENGINE_STALL"
    OUTPUT_PARSE_ERROR = "OUTPUT_PARSE_ERROR"
    PREPARE_ERROR = "PREPARE_ERROR"
    MALFORMED_INPUT = "MALFORMED_INPUT"
    UNSUPPORTED_REQUEST = "UNSUPPORTED_REQUEST"

    def __str__(self) -> str:
        return self.value

    @property
    def meaning(self) -> str:
        return MEANINGS[self]


# One line each; the README's error table gives the longer story and is checked against these
# names (tests/test_errors.py).
MEANINGS: dict[RowError, str] = {
    RowError.MISSING_IMAGE: "the image cell is null or empty",
    RowError.DECODE_ERROR: "not an image, or an allowed format that is corrupt or truncated",
    RowError.UNSUPPORTED_FORMAT: "a format Pillow knows but image.formats leaves out",
    RowError.IMAGE_TOO_LARGE: "source pixels over image.max_image_pixels (decompression bomb)",
    RowError.IMAGE_TOO_SMALL: "a side under image.min_side",
    RowError.ASPECT_RATIO: "long side over 200x the short side (Qwen2.5-VL refuses these)",
    RowError.FETCH_ERROR: "an image URI could not be fetched",
    RowError.BAD_PROMPT: "prompt null or empty, or a template field null in the row",
    RowError.MISSING_ID: "the id column is null for this row",
    RowError.PROMPT_TOO_LONG: "prompt text over prompt.max_prompt_tokens tokens",
    RowError.ENGINE_ERROR: "the engine failed on this row even alone",
    RowError.ENGINE_TIMEOUT: "no answer within the engine's request timeout, twice",
    RowError.ENGINE_CRASH: "the engine process died each time this row ran alone",
    RowError.ENGINE_STALL: "the engine stopped answering each time this row ran alone",
    RowError.OUTPUT_PARSE_ERROR: "structured output: not JSON, or not the schema",
    RowError.PREPARE_ERROR: "an unexpected error while preparing this row (a bug)",
    RowError.MALFORMED_INPUT: "a manifest line, CSV record or tar sample that cannot be read",
    RowError.UNSUPPORTED_REQUEST: "a Batch line asks for settings other lines' job runs without",
}

# The codes that describe the image itself (decided before any engine runs).
IMAGE_CODES = (
    RowError.MISSING_IMAGE,
    RowError.DECODE_ERROR,
    RowError.UNSUPPORTED_FORMAT,
    RowError.IMAGE_TOO_LARGE,
    RowError.IMAGE_TOO_SMALL,
    RowError.ASPECT_RATIO,
)


class Exit(IntEnum):
    """Exit codes of ``qvl-batch`` commands (the README's table is checked against these)."""

    OK = 0
    PROBLEMS = 1  # plan found problems; verify found violations of the output contract
    CONFIG = 2  # bad config, input or output path (nothing ran); status / verify: no job there
    REFUSED = 3  # the output holds a job with another fingerprint, or another driver's lease
    FAILED = 4  # the job failed; committed units are kept
    INTERRUPTED = 130  # Ctrl-C; committed units are kept
    TERMINATED = 143  # SIGTERM (128 + 15, the shell's convention); committed units are kept


# The process exit status of an actor whose engine died (it exits so the driver replaces it).
ACTOR_ENGINE_DEAD = 70


class RowFailure(Exception):
    """A row that cannot run (bad image, prompt, id or fetch): ``code`` is its stable
    :class:`RowError`, ``message`` says what happened; it becomes an error row."""

    def __init__(self, code: str, message: str):
        super().__init__(code, message)  # both in args, so it pickles across processes
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class QvlError(Exception):
    """Base of the errors a command reports as one line and an exit code (:func:`exit_for`)."""


class ConfigError(QvlError, ValueError):
    """A bad job configuration: raised before any work, with a message that says what to fix."""


class InputError(QvlError, ValueError):
    """The input cannot be planned (no files, missing columns): raised before any work."""


class StorageError(QvlError, RuntimeError):
    """A storage path that cannot be used: says which path and why."""


class ClusterError(QvlError, RuntimeError):
    """The cluster cannot run this job (no room for an actor, engine failed to load)."""


class NotAJobOutput(QvlError, ValueError):
    """A path that holds no qvl-batch output (no readable ``_job.json``)."""


class ResumeRefused(QvlError, RuntimeError):
    """The output belongs to a job with another fingerprint; says what differs and what to do."""


class LeaseHeld(QvlError, RuntimeError):
    """Another driver holds the output's ``_lease.json`` and its heartbeat is fresh."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the Ctrl-C path (committed units kept, lease released) by the job
    commands' handler; a KeyboardInterrupt so every cleanup that handles Ctrl-C handles it."""


class SubmitError(QvlError, RuntimeError):
    """The Jobs API cannot be reached, or it refused a request."""


def exit_for(exc: QvlError) -> Exit:
    """The exit code a command returns for ``exc``."""
    return Exit.REFUSED if isinstance(exc, (ResumeRefused, LeaseHeld)) else Exit.CONFIG
