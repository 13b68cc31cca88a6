"""Model inputs for the hf engine: pixels normalised and patched with torch on the engine's device.

The transformers processor for Qwen2-VL turns each image into patches with numpy on the CPU (the
PIL backend; its torchvision backend is not installed with the runner): rescale to [0, 1],
normalise by the CLIP mean and std, cut into 14x14 patches in 2x2 merge order, and repeat each
patch over the two temporal frames. For a batch of 128 images at 448x448 that is ~400 MB of
float32 written by one Python thread, on the critical path of every ``generate`` call, and it
competes for the GIL with the actor's prepare threads. :class:`ImageInputs` does the same
arithmetic as a few tensor ops on the GPU from the uint8 pixels (77 MB for that batch), and the
processor only tokenizes the text, with each image's placeholder already expanded to its token
count. ``tests/engines/test_hf_inputs.py`` checks every tensor equals the processor's own output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


class ImageInputs:
    """The processor's ``pixel_values`` and ``image_grid_thw``, computed with torch.

    Reads the constants (patch, merge and temporal sizes, rescale factor, mean, std) from the
    model's own image processor, so a checkpoint with other values gets them.
    """

    def __init__(self, image_processor: Any, device: torch.device, dtype: torch.dtype):
        ip = image_processor
        self.patch = int(ip.patch_size)
        self.merge = int(ip.merge_size)
        self.temporal = int(ip.temporal_patch_size)
        self.device = device
        self.dtype = dtype
        self.scale = float(ip.rescale_factor) if ip.do_rescale else 1.0
        shape = (1, -1, 1, 1)
        if ip.do_normalize:
            self.mean = torch.tensor(ip.image_mean, dtype=torch.float32, device=device).view(shape)
            self.std = torch.tensor(ip.image_std, dtype=torch.float32, device=device).view(shape)
        else:
            self.mean = self.std = None

    def tokens(self, width: int, height: int) -> int:
        """Vision tokens of one image already on the grid."""
        return (height // self.patch) * (width // self.patch) // self.merge**2

    def __call__(self, images: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values`` (patches of every image, in order) and ``image_grid_thw``.

        ``images`` are PIL images whose sides are multiples of patch x merge (the runner
        resized them). Images of one size are stacked and done together.
        """
        return self.device_side(self.host_side(images))

    def host_side(self, images: list[Any]) -> HostImages:
        """The CPU part: images grouped by size, each group stacked as uint8 (pinned for CUDA)."""
        side = self.patch * self.merge
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            width, height = image.size
            if width % side or height % side:
                raise ValueError(f"image {width}x{height} is not on the {side}-pixel grid")
            groups.setdefault((height, width), []).append(i)
        stacked = []
        for (height, width), idx in groups.items():
            arrays = [np.asarray(_rgb(images[i])) for i in idx]
            host = torch.from_numpy(np.stack(arrays))  # n, H, W, C uint8
            if self.device.type == "cuda":
                # The adapter's prepare thread: a host allocation, no stream work, so a decode
                # graph captured meanwhile on the batch thread (thread-local capture) is safe.
                host = host.pin_memory()
            stacked.append((idx, height, width, host))
        grid = [[1, img.size[1] // self.patch, img.size[0] // self.patch] for img in images]
        return HostImages(len(images), stacked, torch.tensor(grid, dtype=torch.long))

    def device_side(self, host: HostImages) -> tuple[torch.Tensor, torch.Tensor]:
        """The patches on the engine's device, in the images' order, and the grids."""
        if len(host.groups) == 1:  # one size (the common case): already in order
            _, height, width, pixels = host.groups[0]
            return self._patches(pixels, height, width).flatten(0, 1), host.grid
        per_image: list[torch.Tensor] = [None] * host.count  # type: ignore[list-item]
        for idx, height, width, pixels in host.groups:
            patches = self._patches(pixels, height, width)
            for j, i in enumerate(idx):
                per_image[i] = patches[j]
        return torch.cat(per_image), host.grid

    def _patches(self, host: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(n, patches, C * T * patch * patch) in the model's dtype, from ``n`` images of one
        size stacked as uint8 (n, H, W, C)."""
        x = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32)
        if self.scale != 1.0:
            x = x * self.scale
        if self.mean is not None:
            x = (x - self.mean) / self.std
        x = x.to(self.dtype)  # before the copy below, which is then in the model's dtype
        n, c = x.shape[:2]
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = height // p, width // p
        x = x.reshape(n, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # n, gh/m, gw/m, m, m, C, p, p
        x = x.unsqueeze(6).expand(n, gh // m, gw // m, m, m, c, t, p, p)  # each frame repeated
        return x.reshape(n, gh * gw, c * t * p * p)


@dataclass
class HostImages:
    """A batch's images on the host: (indices, height, width, uint8 stack) per size, grids."""

    count: int
    groups: list[tuple[list[int], int, int, torch.Tensor]]
    grid: torch.Tensor


def _rgb(image: Any) -> Any:
    return image if image.mode == "RGB" else image.convert("RGB")


class BatchInputs:
    """A batch's model inputs for the hf engine: token ids and mask (left-padded), pixel values
    and grids, made on the host (``host_side``, which the batching adapter runs ahead) and then
    on the device (``device_side``). Pixels: ``device`` (:class:`ImageInputs`) or ``processor``
    (the model's image processor, numpy on the CPU); both give the same tensors."""

    def __init__(
        self, processor: Any, tokens: Any, device: torch.device, dtype: torch.dtype, image_id: int
    ):
        self.processor, self.tokens, self.device, self.dtype = processor, tokens, device, dtype
        self.image_id = image_id
        self.images: ImageInputs | None = None  # the device path, when in use
        self._device_path: ImageInputs | None = None  # built on first use (a probe call)
        self._mm_type_ids = False

    @property
    def mode(self) -> str:
        return "device" if self.images is not None else "processor"

    def use(self, mode: str) -> None:
        """``device`` or ``processor`` from now on (``engine.hf.preprocess``)."""
        if mode == "device" and self._device_path is None:
            self._device_path = self._probe_device_path()
        self.images = self._device_path if mode == "device" else None

    def model_inputs(self, batch: list[Any]) -> Any:
        return self.device_side(self.host_side(batch))

    def host_side(self, batch: list[Any]) -> tuple[Any, HostImages | None]:
        """Tokens (and, on the processor's path, the pixels), and the images stacked."""
        texts = [self.tokens.render(r.prompt, r.system) for r in batch]
        images = [r.image for r in batch]
        if self.images is not None:
            host = self.images.host_side(images)
            texts = expand_placeholders(texts, images, self.processor.image_token, self.images)
            with self.tokens.lock:
                inputs = self.tokens.tokenizer(texts, padding=True, return_tensors="pt")
            if self._mm_type_ids:  # transformers 5: which tokens are an image's
                inputs["mm_token_type_ids"] = self._modality_ids(inputs["input_ids"])
            return inputs, host
        with self.tokens.lock:
            inputs = self.processor(
                text=texts,
                images=images,
                padding=True,
                return_tensors="pt",
                do_resize=False,  # the runner resized to the grid already
            )
        patch = int(self.processor.image_processor.patch_size)
        for image, thw in zip(images, inputs["image_grid_thw"].tolist()):
            width, height = image.size
            if thw != [1, height // patch, width // patch]:
                raise ValueError(f"processor grid {thw} for a {width}x{height} image: resized?")
        return inputs, None

    def device_side(self, host: tuple[Any, HostImages | None]) -> Any:
        inputs, images = host
        if images is not None:
            assert self.images is not None
            pixels, grid = self.images.device_side(images)
            inputs["pixel_values"], inputs["image_grid_thw"] = pixels, grid  # grids from sizes
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    @staticmethod
    def pad_rows(inputs: Any, n: int, pad_id: int) -> None:
        """Append ``n`` dummy rows to the batch: one attended token each (the first row's last,
        so no row ends in padding: transformers would warn of right padding), no image."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        dummy_mask = torch.zeros((n, mask.shape[1]), dtype=mask.dtype, device=mask.device)
        dummy_mask[:, -1] = 1
        dummy = torch.full((n, ids.shape[1]), pad_id, dtype=ids.dtype, device=ids.device)
        dummy[:, -1] = ids[0, -1]
        inputs["input_ids"] = torch.cat([ids, dummy])
        inputs["attention_mask"] = torch.cat([mask, dummy_mask])
        if "mm_token_type_ids" in inputs:
            types = inputs["mm_token_type_ids"]
            inputs["mm_token_type_ids"] = torch.cat(
                [types, torch.zeros_like(types[:1]).expand(n, -1)]
            )

    def _probe_device_path(self) -> ImageInputs | None:
        """The torch image path, if this processor returns only what it knows how to build
        (token ids and mask, optionally modality ids, pixel values, grids); else None (the
        processor does it all, with a warning)."""
        from PIL import Image

        side = int(self.processor.image_processor.patch_size) * 2
        probe = self.processor(
            text=[self.tokens.render("probe", None)],
            images=[Image.new("RGB", (side, side))],
            padding=True,
            return_tensors="pt",
            do_resize=False,
        )
        known = {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
        extra = set(probe.keys()) - known - {"mm_token_type_ids"}
        if extra:
            log.warning(
                "engine.hf.preprocess=device: this processor also returns %s; using the "
                "processor for images",
                sorted(extra),
            )
            return None
        self._mm_type_ids = "mm_token_type_ids" in probe
        return ImageInputs(self.processor.image_processor, self.device, self.dtype)

    def _modality_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Per token: 1 for an image's, 0 for text (what the processor returns with them)."""
        make = getattr(self.processor, "create_mm_token_type_ids", None)
        if make is not None:
            return torch.tensor(make(ids.tolist()), dtype=torch.long)
        return (ids == self.image_id).long()


def expand_placeholders(texts: list[str], images: list[Any], token: str, inputs: ImageInputs):
    """Each text's one image placeholder repeated to its image's token count (as the processor
    does before tokenizing)."""
    out = []
    for text, image in zip(texts, images):
        if (found := text.count(token)) != 1:
            raise ValueError(f"expected one {token} placeholder per prompt, found {found}")
        out.append(text.replace(token, token * inputs.tokens(*image.size)))
    return out
