"""Builds the stand-in API from ``tests/data/trtllm_api_surface.json`` (see the package docstring).

Every class accepts exactly the keyword names that file lists for it (REQUIRED ones required) and
rejects any other, as TensorRT-LLM's pydantic args (extra='forbid') and kw-only dataclasses do.
Nothing here is hand-written per field: a name added to or removed from the JSON changes what the
stand-in accepts.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

SURFACE_PATH = Path(__file__).resolve().parents[2] / "data" / "trtllm_api_surface.json"
SURFACE: dict[str, Any] = json.loads(SURFACE_PATH.read_text())

IMAGE_PAD = "<|image_pad|>"
DEFAULT_IMAGE_TOKEN_ID = 151655  # Qwen2.5-VL; a model dir's config.json may say otherwise
DEFAULT_VOCAB = 151643
PATCH = 28  # one Qwen2.5-VL vision token per 28x28 pixels
WORDS = ("a", "photo", "of", "cat", "dog", "tree", "sky", "river", "city", "red", "blue", "old")


class ContractError(TypeError, ValueError):
    """A call the real API would refuse (unknown or missing keyword, wrong input shape)."""


@dataclass(frozen=True)
class Param:
    name: str
    required: bool
    default: Any


def _default(desc: str) -> Any:
    """The Python value of a rendered default ("32", "'auto'", "None (...)"), else the text."""
    for text in (desc, desc.split(" ")[0]):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            continue
    return desc


def params(*sections: dict[str, str]) -> dict[str, Param]:
    """Constructor/call parameters from JSON sections; properties are not parameters."""
    out: dict[str, Param] = {}
    for section in sections:
        for name, desc in section.items():
            if desc.startswith("property"):
                continue
            required = desc.startswith("REQUIRED")
            out[name] = Param(name, required, None if required else _default(desc))
    return out


def bare_name(entry: str) -> str:
    """'mm_embedding_handle (1.0-era)' -> 'mm_embedding_handle'; 'result()' -> 'result'."""
    return entry.split(" ")[0].split("(")[0]


def bind(what: str, spec: dict[str, Param], args: tuple, kwargs: dict[str, Any]) -> dict:
    """Check a call against ``spec`` (positional args fill names in order) and return its kwargs."""
    if len(args) > len(spec):
        raise ContractError(f"{what}() takes {len(spec)} arguments, got {len(args)} positional")
    bound = dict(zip(spec, args))
    doubled = sorted(set(bound) & set(kwargs))
    if doubled:
        raise ContractError(f"{what}() got multiple values for {doubled}")
    bound.update(kwargs)
    unknown = sorted(set(bound) - set(spec))
    if unknown:
        raise ContractError(
            f"{what}(): unexpected keyword(s) {unknown}; extra inputs not permitted"
        )
    missing = [p.name for p in spec.values() if p.required and p.name not in bound]
    if missing:
        raise ContractError(f"{what}(): missing required argument(s) {missing}")
    return bound


class KwOnly:
    """A stand-in constructor: keyword-only, exactly the names in ``PARAMS``."""

    PARAMS: ClassVar[dict[str, Param]] = {}

    def __init__(self, *args: Any, **kwargs: Any):
        if args:
            raise ContractError(f"{type(self).__name__}() takes keyword arguments only")
        given = bind(type(self).__name__, self.PARAMS, (), kwargs)
        for name, p in self.PARAMS.items():
            setattr(self, name, given.get(name, p.default))
        self.passed_kwargs = given  # what the caller passed (tests inspect it)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.passed_kwargs!r})"


def kw_only_class(name: str, spec: dict[str, Param]) -> type:
    return type(name, (KwOnly,), {"PARAMS": spec, "__doc__": f"Stand-in {name} (JSON fields)."})


def home(section: dict[str, Any], default: str) -> str:
    """The module a class is imported from, per the JSON's "import"/"entry" (else ``default``)."""
    path = section.get("import") or section.get("entry") or ""
    path = path.split(" ")[0]
    return path.rsplit(".", 1)[0] if "." in path else default


GuidedDecodingParams = kw_only_class(
    "GuidedDecodingParams", params(SURFACE["GuidedDecodingParams"]["fields"])
)


class SamplingParams(kw_only_class("SamplingParams", params(SURFACE["SamplingParams"]["fields"]))):
    """Stand-in ``SamplingParams``; ``guided_decoding`` checked as upstream's ``_validate`` does."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        guide = self.passed_kwargs.get("guided_decoding")
        if guide is None:
            return
        if not isinstance(guide, GuidedDecodingParams):
            raise ContractError(f"guided_decoding must be a GuidedDecodingParams, got {guide!r}")
        guides = sorted(n for n, v in guide.passed_kwargs.items() if v)
        if len(guides) > 1:
            raise ContractError(f"Only one guide can be used for a request, but got {guides}")


KvCacheConfig = kw_only_class("KvCacheConfig", params(SURFACE["KvCacheConfig"]["fields"]))
CudaGraphConfig = kw_only_class("CudaGraphConfig", params(SURFACE["CudaGraphConfig"]["fields"]))
CompletionOutput = kw_only_class("CompletionOutput", params(SURFACE["CompletionOutput"]["fields"]))

# Where each class lives. The JSON gives no import path for CudaGraphConfig: like KvCacheConfig it
# is defined in llmapi/llm_args.py, and upstream examples import it from tensorrt_llm.llmapi.
HOMES = {
    "LLM": home(SURFACE["LLM.__init__"], "tensorrt_llm"),
    "SamplingParams": home(SURFACE["SamplingParams"], "tensorrt_llm"),
    "GuidedDecodingParams": home(SURFACE["GuidedDecodingParams"], "tensorrt_llm.llmapi"),
    "KvCacheConfig": home(SURFACE["KvCacheConfig"], "tensorrt_llm.llmapi"),
    "CudaGraphConfig": home(SURFACE["CudaGraphConfig"], "tensorrt_llm.llmapi"),
}

LLM_PARAMS = params(
    SURFACE["LLM.__init__"]["BaseLlmArgs_fields"], SURFACE["LLM.__init__"]["TorchLlmArgs_fields"]
)
GENERATE_ASYNC_PARAMS = params(SURFACE["LLM.generate_async"]["params"])
PROMPT_KEYS = SURFACE["PromptInputs_dict_keys"]
OUTPUT_ATTRS = [bare_name(a) for a in SURFACE["RequestOutput"]["attributes"]]
NESTED = {"kv_cache_config": KvCacheConfig, "cuda_graph_config": CudaGraphConfig}


class RequestOutput:
    """Finished-on-return request: attributes from the JSON, ``result()`` gives itself."""

    def __init__(self, **values: Any):
        for name in OUTPUT_ATTRS:
            setattr(self, name, values.pop(name, None))
        if values:
            raise AssertionError(f"stand-in bug: RequestOutput has no {sorted(values)}")

    def result(self) -> RequestOutput:
        return self

    async def aresult(self) -> RequestOutput:
        return self


def check_prompt(inputs: Any) -> dict[str, Any]:
    """A PromptInputs value: a str, or a TextPrompt/TokensPrompt dict with only its keys."""
    if isinstance(inputs, str):
        return {"prompt": inputs}
    if not isinstance(inputs, dict):
        raise ContractError(f"inputs must be a str or a prompt dict, got {type(inputs).__name__}")
    kind = "TextPrompt" if "prompt" in inputs else "TokensPrompt"
    if kind == "TokensPrompt" and "prompt_token_ids" not in inputs:
        raise ContractError(f"a prompt dict needs 'prompt' or 'prompt_token_ids': {sorted(inputs)}")
    unknown = sorted(set(inputs) - set(PROMPT_KEYS[kind]))
    if unknown:
        raise ContractError(f"{kind} has no key(s) {unknown}; allowed: {PROMPT_KEYS[kind]}")
    return inputs


def images_of(inputs: dict[str, Any]) -> list[Any]:
    """The images of ``multi_modal_data`` (only images are modelled here), checked to be PIL."""
    mm = inputs.get("multi_modal_data") or {}
    if not isinstance(mm, dict) or set(mm) - {"image"}:
        raise ContractError(f"multi_modal_data must be {{'image': [...]}}, got {mm!r}")
    images = mm.get("image") or []
    if not isinstance(images, list):
        raise ContractError("multi_modal_data['image'] must be a list of images")
    for img in images:
        if not (hasattr(img, "size") and hasattr(img, "tobytes") and hasattr(img, "mode")):
            raise ContractError(f"not an image: {type(img).__name__}")
    return images


def read_model_config(model: Any) -> dict[str, Any]:
    path = Path(str(model)) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class ToyTokenizer:
    """Whitespace words and ``<|...|>`` specials; each image pad expands to its vision tokens."""

    def __init__(self, image_token_id: int, vocab: int):
        self.image_token_id = image_token_id
        self.vocab = vocab

    def word_id(self, word: str) -> int:
        wid = 16 + int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big") % (
            self.vocab - 16
        )
        return wid + 1 if wid == self.image_token_id else wid

    def encode(self, text: str, images: list[Any]) -> list[int]:
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != len(images):
            raise ContractError(
                f"prompt has {len(pieces) - 1} {IMAGE_PAD} placeholder(s) "
                f"for {len(images)} image(s)"
            )
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            ids.extend(
                self.word_id(w) for w in piece.replace("<|", " <|").replace("|>", "|> ").split()
            )
            if i < len(images):
                w, h = images[i].size
                ids.extend([self.image_token_id] * max(1, (w // PATCH) * (h // PATCH)))
        return ids


def fake_completion(prompt: str, images: list[Any], sampling: Any, tokenizer: ToyTokenizer):
    """Deterministic output from the prompt, the image pixels and the seed; honours max_tokens."""
    digest = hashlib.sha256(prompt.encode())
    for img in images:
        digest.update(img.tobytes())
    digest.update(str(sampling.seed).encode())
    raw = digest.digest()
    wanted = 3 + raw[0] % 14
    n = min(wanted, int(sampling.max_tokens))
    words = [WORDS[b % len(WORDS)] for b in raw[1 : 1 + n]]
    return CompletionOutput(
        index=0,
        text=" ".join(words),
        token_ids=[tokenizer.word_id(w) for w in words],
        finish_reason="stop" if wanted <= sampling.max_tokens else "length",
    )


class LLM(KwOnly):
    """Stand-in ``tensorrt_llm.LLM``: checks every call against the JSON, generates on the CPU."""

    PARAMS = LLM_PARAMS

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        for name, cls in NESTED.items():
            value = self.passed_kwargs.get(name)
            if isinstance(value, dict):
                value = cls(**value)
            if value is not None and name in self.passed_kwargs and not isinstance(value, cls):
                raise ContractError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
        config = read_model_config(self.model)
        image_id = config.get("image_token_id", DEFAULT_IMAGE_TOKEN_ID)
        self.tokenizer = ToyTokenizer(image_id, config.get("vocab_size", DEFAULT_VOCAB))
        self.shutdown_calls = 0
        self.submitted = 0

    def generate_async(self, *args: Any, **kwargs: Any) -> RequestOutput:
        call = bind("LLM.generate_async", GENERATE_ASYNC_PARAMS, args, kwargs)
        if self.shutdown_calls:
            raise RuntimeError("LLM is shut down")
        inputs = check_prompt(call["inputs"])
        sampling = call.get("sampling_params")
        if sampling is None:
            sampling = SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise ContractError(f"sampling_params must be SamplingParams, got {type(sampling)}")
        if sampling.guided_decoding is not None and self.guided_decoding_backend is None:
            # The JSON's GuidedDecodingParams "requires": no backend, no guided decoder.
            raise ContractError("guided_decoding needs LLM(guided_decoding_backend=...)")
        images = images_of(inputs)
        prompt = inputs.get("prompt", "")
        ids = inputs.get("prompt_token_ids") or self.tokenizer.encode(prompt, images)
        self.submitted += 1
        return RequestOutput(
            request_id=self.submitted,
            prompt=prompt,
            prompt_token_ids=ids,
            outputs=[fake_completion(prompt, images, sampling, self.tokenizer)],
            finished=True,
        )

    def shutdown(self) -> None:
        self.shutdown_calls += 1
