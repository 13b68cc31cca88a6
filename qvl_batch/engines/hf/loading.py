"""A model directory for the hf engine: local, or copied once per machine from an fsspec URL,
and its processor (the model's own chat template kept)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import transformers


def local_model_dir(model: str, storage_options: dict | None = None) -> str:
    """A local directory for ``model``: itself, or a once-per-machine copy of an fsspec URL."""
    if "://" not in model or model.startswith("file://"):
        return model.removeprefix("file://")
    import fsspec

    root = Path(os.environ.get("QVL_BATCH_MODEL_CACHE", Path.home() / ".cache/qvl-batch/models"))
    target = root / hashlib.sha256(model.encode()).hexdigest()[:16]
    if (target / ".complete").exists():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
    try:
        fs, path = fsspec.core.url_to_fs(model, **(storage_options or {}))
        fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True)
        (tmp / ".complete").write_text(model + "\n")
        try:
            tmp.rename(target)  # atomic; another actor may have won the race
        except OSError:
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def load_processor(path: str, trust_remote_code: bool = False, **kwargs: Any):
    """``AutoProcessor.from_pretrained``, or, without torchvision, the same processor class built
    from its image processor and tokenizer with no video processor.

    Both transformers 4.57 and 5.x refuse to load Qwen2.5-VL's processor without torchvision
    (its video processor needs it), though images go through a PIL/numpy image processor fine.
    """
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
    image_processor = AutoImageProcessor.from_pretrained(
        path, trust_remote_code=trust_remote_code, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    base = _processor_class(path)

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = base.__name__
    template = _read_chat_template(path) or getattr(tokenizer, "chat_template", None)
    return ImageOnlyProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=template,
    )


def _processor_class(path: str) -> type:
    """The processor class a model directory names (Qwen2_5_VLProcessor if it names none)."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = None
    for fname in ("processor_config.json", "preprocessor_config.json"):
        if Path(path, fname).is_file():
            name = name or json.loads(Path(path, fname).read_text()).get("processor_class")
    if name is None and Path(path, "config.json").is_file():
        model_type = json.loads(Path(path, "config.json").read_text()).get("model_type")
        name = PROCESSOR_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name or "", None) or transformers.Qwen2_5_VLProcessor


def _read_chat_template(path: str) -> str | None:
    jinja, js = Path(path, "chat_template.jinja"), Path(path, "chat_template.json")
    if jinja.is_file():
        return jinja.read_text()
    if js.is_file():
        return json.loads(js.read_text()).get("chat_template")
    return None
