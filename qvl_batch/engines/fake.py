"""A deterministic engine for planning, benchmarks and tests.

Output text is a function of the image content hash, the prompt and the seed only
(:func:`expected_text`), so tests can compute what every row must say. A latency model
(per batch, per row, per decode step) stands in for a GPU; fault injection fails chosen rows,
fails every batch that holds a chosen row, answers with broken JSON for chosen rows (structured
output), SIGKILLs its process on a chosen row, raises once
after N rows, or SIGKILLs its own process after N rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time

from ..config import Config
from ..structured import example_for
from .base import Engine, EngineError, Request, Result

WORDS = (
    "a",
    "photo",
    "of",
    "cat",
    "dog",
    "tree",
    "sky",
    "river",
    "city",
    "street",
    "car",
    "person",
    "table",
    "window",
    "light",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "bright",
    "dark",
    "old",
    "new",
    "wooden",
    "stone",
    "field",
    "mountain",
    "beach",
    "food",
    "plate",
)


def expected_text(
    image_sha256: str, prompt: str, seed: int, max_tokens: int, schema: dict | None = None
) -> tuple[str, str]:
    """(text, finish_reason) the fake engine returns for this image, prompt and seed.

    With a structured-output ``schema`` the answer is a valid JSON instance of it (as guided
    decoding would give), drawn from the same digest.
    """
    digest = hashlib.sha256(f"{image_sha256}\0{prompt}\0{seed}".encode()).digest()
    if schema is not None:
        return json.dumps(example_for(schema, random.Random(digest))), "stop"
    wanted = 3 + digest[0] % 14  # 3..16 words
    n = min(wanted, max_tokens)
    words = [WORDS[b % len(WORDS)] for b in digest[1 : 1 + n]]
    return " ".join(words), ("stop" if wanted <= max_tokens else "length")


class FakeEngine(Engine):
    """Deterministic stand-in for a VLM with a latency model and fault injection."""

    name = "fake"
    version = "1"
    guided = True  # with a schema, every answer is a valid instance (bad_json_ids aside)

    def __init__(self, cfg: Config, incarnation: int = 0):
        self.fake = cfg.engine.fake
        self.sampling = cfg.sampling
        self.schema = cfg.structured.json_schema
        self._bad_json_ids = set(self.fake.bad_json_ids)
        self.incarnation = incarnation
        self.rows_seen = 0
        self._raised = False
        self._fail_ids = set(self.fake.fail_ids)
        self._raise_ids = set(self.fake.raise_ids)
        self._crash_ids = set(self.fake.crash_ids)

    def generate(self, requests: list[Request]) -> list[Result]:
        self.rows_seen += len(requests)
        f = self.fake
        ids = {r.row_id for r in requests}
        if ids & self._crash_ids:
            os.kill(os.getpid(), signal.SIGKILL)  # a poison row that takes the process down
        if poison := sorted(ids & self._raise_ids):
            raise EngineError(f"injected batch failure (poison rows {poison})")
        crash_due = f.exit_after_rows and self.rows_seen >= f.exit_after_rows
        if crash_due and self.incarnation < f.exit_incarnations:
            os.kill(os.getpid(), signal.SIGKILL)  # a real hard crash mid-batch
        if f.raise_after_rows and not self._raised and self.rows_seen >= f.raise_after_rows:
            self._raised = True
            raise EngineError(f"injected fault after {self.rows_seen} rows")
        results = []
        longest = 0
        for req in requests:
            if req.row_id in self._fail_ids:
                results.append(
                    Result(req.key, error_code="ENGINE_ERROR", error_message="injected row failure")
                )
                continue
            text, finish = expected_text(
                req.image_sha256,
                req.prompt,
                self.sampling.seed,
                self.sampling.max_tokens,
                self.schema,
            )
            if req.row_id in self._bad_json_ids:
                text = text[: len(text) // 2]  # an answer cut short: not JSON
            out_tokens = len(text.split())
            longest = max(longest, out_tokens)
            results.append(
                Result(
                    req.key,
                    text=text,
                    finish_reason=finish,
                    prompt_tokens=req.text_tokens + req.vision_tokens,
                    vision_tokens=req.vision_tokens,
                    output_tokens=out_tokens,
                )
            )
        delay = f.batch_latency_s + f.row_latency_s * len(requests) + f.token_latency_s * longest
        if delay > 0:
            time.sleep(delay)
        return results
