"""The hf engine's text side: the chat template, exact prompt token counts, and the processor's
tokenizer used one call at a time (it sets its padding per call; the batching adapter prepares
a batch while the last one's answers are decoded)."""

from __future__ import annotations

import threading
from typing import Any

from ...rows.prompts import chat_messages


class PromptTokens:
    """Renders, counts, tokenizes and decodes for one processor."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.lock = threading.Lock()  # the processor's tokenizer: one call at a time
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._counter = None
        if backend is not None:  # a private copy for counting: no padding, no lock
            from tokenizers import Tokenizer

            self._counter = Tokenizer.from_str(backend.to_str())
            self._counter.no_padding()
            self._counter.no_truncation()
        self._count_lock = threading.Lock()
        self._overhead: dict[str | None, int] = {}
        self.split_ok = self._check_split_counting()

    def render(self, prompt: str, system: str | None) -> str:
        """The templated text of one request, with one image placeholder."""
        return self.processor.apply_chat_template(
            chat_messages(prompt, system), tokenize=False, add_generation_prompt=True
        )

    def count(self, prompt: str, system: str | None) -> int:
        """Exact text tokens of the templated prompt, not counting the image's tokens."""
        with self._count_lock:
            if not self.split_ok:
                return self._full_count(prompt, system)
            if system not in self._overhead:
                self._overhead[system] = self._full_count("", system)
            return self._overhead[system] + self._encode_len(prompt)

    def decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _encode_len(self, text: str, specials: bool = False) -> int:
        if self._counter is not None:
            return len(self._counter.encode(text, add_special_tokens=specials).ids)
        with self.lock:
            return len(self.tokenizer(text, add_special_tokens=specials)["input_ids"])

    def _full_count(self, prompt: str, system: str | None) -> int:
        """Tokens of the templated text as the processor tokenizes it, minus the image pad."""
        text = self.render(prompt, system).replace(self.processor.image_token, "", 1)
        return self._encode_len(text, specials=True)

    def _check_split_counting(self) -> bool:
        """Does template overhead + prompt tokens equal the full count (prompt between specials)?"""
        probe = "Probe: 12 words, (x) y?\nEnd"
        with self._count_lock:
            whole = self._full_count(probe, None)
            return whole == self._full_count("", None) + self._encode_len(probe)
