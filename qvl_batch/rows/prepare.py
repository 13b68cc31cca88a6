"""A row's preparation, one rule for the runner's actors and ``plan``: fetch the image bytes,
look for an earlier result (reuse: then nothing is decoded), count the prompt's tokens against
``prompt.max_prompt_tokens``, then decode, orient and resize the image. A problem with the row
raises :class:`~qvl_batch.errors.RowFailure` with its code; anything else is the caller's
PREPARE_ERROR."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..errors import RowError, RowFailure
from ..storage import Storage
from .images import PreparedImage, prepare_image
from .reader import RowInput, fetch_uri


@dataclass
class PreparedRow:
    """A row ready for an engine."""

    image: PreparedImage
    text_tokens: int
    result_key: str | None

    def meta(self) -> dict[str, Any]:
        """The output row's image columns and result key."""
        img = self.image
        return {
            "image_width": img.original_size[0],
            "image_height": img.original_size[1],
            "resized_width": img.resized_size[0],
            "resized_height": img.resized_size[1],
            "image_sha256": img.sha256,
            "image_notes": ",".join(img.notes) or None,
            "result_key": self.result_key,
        }


@dataclass
class ReusedRow:
    """A row whose result an earlier output has: ``earlier`` is that output's row."""

    result_key: str
    earlier: dict[str, Any]
    job: str


def prepare_row(
    row: RowInput,
    cfg: Config,
    storage: Storage,
    count_tokens: Callable[[str, str | None], int],
    key_of: Callable[[str, str], str] | None = None,
    find: Callable[[str], tuple[dict, str] | None] | None = None,
) -> PreparedRow | ReusedRow:
    """``row`` prepared (or found in an earlier output). ``count_tokens(prompt, system)``: the
    engine's count; ``key_of(image_sha256, prompt)``: the row's result key, where results are
    keyed; ``find(result_key)``: an earlier output's row and job, if reuse is on."""
    data = row.image
    if isinstance(data, str):
        data = fetch_uri(data, storage)
    digest = hashlib.sha256(data).hexdigest() if data else None
    prompt = row.prompt or ""
    rkey = key_of(digest, prompt) if digest and key_of else None
    if rkey and find is not None and (found := find(rkey)):
        return ReusedRow(rkey, *found)
    system = cfg.prompt.system
    text_tokens = count_tokens(prompt, system)
    if text_tokens > cfg.prompt.max_prompt_tokens:
        raise RowFailure(
            RowError.PROMPT_TOO_LONG,
            f"prompt is {text_tokens} tokens; prompt.max_prompt_tokens is "
            f"{cfg.prompt.max_prompt_tokens}",
        )
    return PreparedRow(prepare_image(data, cfg.image, digest), text_tokens, rkey)
