"""The chat every engine renders (qvl_batch/rows/prompts.py): hf and trtllm send the same messages,
also for an empty system prompt (they used to disagree: trtllm dropped it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qvl_batch.errors import RowFailure
from qvl_batch.rows.prompts import chat_messages, render_prompt, template_fields


class _Template:
    """A processor/tokenizer stand-in that records what it was asked to render."""

    def __init__(self):
        self.seen = []

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        self.seen.append(messages)
        return "rendered"


def test_none_is_the_template_default_and_empty_is_an_empty_system_turn():
    assert [m["role"] for m in chat_messages("Describe.", None)] == ["user"]
    empty = chat_messages("Describe.", "")
    assert [m["role"] for m in empty] == ["system", "user"]
    assert empty[0]["content"] == [{"type": "text", "text": ""}]
    messages = chat_messages("Describe.", "Be brief.")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == [{"type": "text", "text": "Be brief."}]
    assert messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "Describe."}]


@pytest.mark.parametrize("system", [None, "", "Be brief."])
def test_hf_and_trtllm_render_the_same_chat(system):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from qvl_batch.engines.hf.tokens import PromptTokens
    from qvl_batch.engines.trtllm.prompts import render_chat

    hf, trt = _Template(), _Template()
    PromptTokens.render(SimpleNamespace(processor=hf), "Describe.", system)
    render_chat(trt, "Describe.", system)
    assert hf.seen == trt.seen == [chat_messages("Describe.", system)]


def test_template_fields_and_rendering():
    assert template_fields("Q: {question} ({lang})") == ["question", "lang"]
    assert render_prompt("Q: {q}", ["q"], {"q": "why?"}) == "Q: why?"
    with pytest.raises(RowFailure) as err:
        render_prompt("Q: {q}", ["q"], {"q": None})
    assert err.value.code == "BAD_PROMPT"
    for unsafe in ("{q.__class__}", "{q[0]}", "{q!r}", "{q:>10}"):
        with pytest.raises(ValueError, match="not allowed"):
            template_fields(unsafe)
