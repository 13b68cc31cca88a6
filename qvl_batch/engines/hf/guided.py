"""Guided decoding for the hf engine: xgrammar compiles ``structured.json_schema`` once per engine
against the tokenizer (padded to the model's vocabulary, the engine's EOS ids as stop tokens);
each batch gets a :class:`GrammarLogitsProcessor` that masks every row's next-token scores to
what the grammar allows, before temperature / top-k / top-p. An answer is one-line JSON in the
schema's property order and ends only where the JSON is complete (or at ``max_tokens``, as
"length"). Without xgrammar, ``structured.guided: auto`` warns once and generates freely,
``required`` refuses to build the engine.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import torch
import transformers

from ...config import StructuredConfig

log = logging.getLogger(__name__)

XGRAMMAR_HINT = "pip install xgrammar (it is in the hf extra: pip install 'qvl-batch[hf]')"


class GrammarLogitsProcessor(transformers.LogitsProcessor):
    """Masks each row's next-token scores to the tokens its grammar matcher allows.

    One per ``generate`` call (matchers carry per-row state). Rows are left-padded, so every
    row's generated tokens start at the same column; a row whose matcher has accepted a stop
    token is finished (transformers pads it from then on) and left unmasked.
    """

    def __init__(
        self,
        xgr: Any,
        compiled: Any,
        batch_size: int,
        vocab_size: int,
        lengths: list[int] | None = None,
    ):
        self._xgr = xgr
        self.matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch_size)]
        self.bitmask = xgr.allocate_token_bitmask(batch_size, vocab_size)
        self.vocab_size = vocab_size
        self.prompt_len: int | None = None
        self.accepted = [0] * batch_size  # generated tokens each matcher has consumed
        # Rows a stopping criterion ends after this many tokens (then padded, like a finished row)
        self.lengths = lengths

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        start = min(self.accepted)  # only the tokens not yet seen cross to the CPU
        new = input_ids[:, self.prompt_len + start :].tolist()
        for i, matcher in enumerate(self.matchers):
            ended = self.lengths is not None and self.accepted[i] >= self.lengths[i]
            unseen = new[i][self.accepted[i] - start :]
            if self.lengths is not None:
                unseen = unseen[: max(0, self.lengths[i] - self.accepted[i])]
            for token in unseen:
                if matcher.is_terminated():
                    break  # after its stop token a finished row only gets padding
                if not matcher.accept_token(token):
                    raise RuntimeError(f"row {i}: the JSON grammar refused token {token}")
            self.accepted[i] = start + len(new[i])
            if ended or matcher.is_terminated():
                self.bitmask[i].fill_(-1)  # all allowed: the row's token is discarded anyway
            else:
                matcher.fill_next_token_bitmask(self.bitmask, i)
        on = scores.device.type if scores.device.type in ("cpu", "cuda") else "cpu"
        masked = scores.to(on)
        self._xgr.apply_token_bitmask_inplace(
            masked, self.bitmask.to(on), vocab_size=self.vocab_size
        )
        return masked.to(scores.device)


class JsonSchemaGuide:
    """A JSON schema compiled once (xgrammar) for one tokenizer and vocabulary."""

    def __init__(
        self, xgr: Any, tokenizer: Any, vocab_size: int, stop_ids: list[int], schema: dict
    ):
        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids)
        )
        # One-line JSON with ", " and ": " separators and no other whitespace: a model cannot
        # pad its answer with blanks until max_tokens, and the answer's length is bounded.
        self.compiled = xgr.GrammarCompiler(info).compile_json_schema(
            json.dumps(schema), any_whitespace=False
        )

    def processor(
        self, batch_size: int, lengths: list[int] | None = None
    ) -> GrammarLogitsProcessor:
        """A fresh processor for one ``generate`` call over ``batch_size`` rows (``lengths``:
        where a stopping criterion ends each row, if one does)."""
        return GrammarLogitsProcessor(
            self._xgr, self.compiled, batch_size, self.vocab_size, lengths
        )


@functools.lru_cache(maxsize=1)
def _warn_unguided(reason: str) -> None:
    log.warning(
        "structured.guided=auto: answers are generated freely and parsed after (%s); for "
        "guided decoding with the hf engine: %s",
        reason,
        XGRAMMAR_HINT,
    )


def import_xgrammar(structured: StructuredConfig) -> Any | None:
    """xgrammar when the job asks for guided decoding, else None (free generation).

    Checked before the model loads: ``required`` without xgrammar raises, ``auto`` warns once.
    """
    if structured.json_schema is None or structured.guided == "off":
        return None
    try:
        import xgrammar
    except ImportError as exc:
        if structured.guided == "required":
            raise ImportError(
                "structured.guided=required: the hf engine constrains answers to the JSON schema "
                f"with xgrammar, which does not import ({exc}); {XGRAMMAR_HINT}"
            ) from exc
        _warn_unguided(f"xgrammar does not import: {exc}")
        return None
    return xgrammar


def make_guide(
    xgr: Any | None,
    structured: StructuredConfig,
    tokenizer: Any,
    vocab_size: int,
    stop_ids: list[int],
) -> JsonSchemaGuide | None:
    """The job's schema compiled by ``xgr``, or None (no xgrammar, or ``auto`` and a schema it
    cannot compile: warned, answers are generated freely)."""
    if xgr is None:
        return None
    try:
        return JsonSchemaGuide(xgr, tokenizer, vocab_size, stop_ids, structured.json_schema or {})
    except Exception as exc:  # e.g. a schema keyword this xgrammar cannot compile
        if structured.guided == "required":
            raise ValueError(f"structured.json_schema: xgrammar cannot compile it: {exc}") from exc
        _warn_unguided(f"xgrammar cannot compile the schema: {exc}")
        return None
