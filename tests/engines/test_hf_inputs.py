"""``engine.hf.preprocess=device`` (pixels patched with torch) must give the model exactly the
inputs the transformers processor gives: same token ids, mask and grids, and pixel values equal
to float32 rounding, for batches of mixed sizes and prompts; and the same generated text."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from qvl_batch.config import Config, ConfigError, EngineConfig, SamplingConfig  # noqa: E402
from qvl_batch.engines.base import Request  # noqa: E402
from qvl_batch.engines.build import make_batch_engine  # noqa: E402
from qvl_batch.engines.hf.inputs import ImageInputs  # noqa: E402
from qvl_batch.engines.hf.settings import HFEngineConfig  # noqa: E402

pytest_plugins = ["tests.models"]  # the session-scoped tiny_model fixture
pytestmark = pytest.mark.timeout(180)

# (width, height): square, landscape, portrait, a repeat of a size (stacked together) and one
# larger image, in an order that interleaves the sizes.
SIZES = [(56, 56), (112, 56), (56, 84), (56, 56), (84, 140), (112, 56), (56, 56)]


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _batch() -> list[Request]:
    out = []
    for i, (w, h) in enumerate(SIZES):
        prompt = "Describe the image." if i % 2 else f"Row {i}: what is shown, in {i + 3} words?"
        system = "You are terse." if i % 3 == 0 else None
        out.append(Request(("u", i), f"r{i}", prompt, system, _image(w, h, i), "", w * h // 784, 0))
    return out


def _engine(model: str, preprocess: str):
    return make_batch_engine(
        Config(
            engine=EngineConfig(
                name="hf", model=model, device="cpu", hf=HFEngineConfig(preprocess=preprocess)
            ),
            sampling=SamplingConfig(max_tokens=12),
        )
    )


@pytest.fixture(scope="module")
def engines(tiny_model):
    device, processor = _engine(tiny_model, "device"), _engine(tiny_model, "processor")
    yield device, processor
    device.close()
    processor.close()


def _assert_same_inputs(ours, theirs) -> None:
    assert set(ours.keys()) == set(theirs.keys())
    for key in theirs:
        if key == "pixel_values":
            assert ours[key].dtype == theirs[key].dtype == torch.float32
            assert ours[key].shape == theirs[key].shape
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=1e-6)
        else:
            assert ours[key].dtype == theirs[key].dtype, key
            assert torch.equal(ours[key], theirs[key]), key


def test_device_inputs_equal_the_processors(engines):
    device, processor = engines
    assert device.inputs.images is not None and processor.inputs.images is None
    batch = _batch()
    ours = device.model_inputs(batch)
    _assert_same_inputs(ours, processor.model_inputs(batch))
    # The grids follow the images, in order (the sizes were interleaved on purpose).
    assert ours["image_grid_thw"].tolist() == [[1, h // 14, w // 14] for w, h in SIZES]
    # One size only: the images are patched as one stack.
    square = [r for r, (w, h) in zip(batch, SIZES) if (w, h) == (56, 56)]
    assert len(square) == 3
    _assert_same_inputs(device.model_inputs(square), processor.model_inputs(square))


def test_device_and_processor_generate_the_same_text(engines):
    device, processor = engines
    batch = _batch()
    a = {r.key: (r.text, r.prompt_tokens, r.vision_tokens) for r in device.generate(batch)}
    b = {r.key: (r.text, r.prompt_tokens, r.vision_tokens) for r in processor.generate(batch)}
    assert a == b
    assert all(text for text, _, _ in a.values())


def test_stage_times_count_each_batch(engines):
    device, _ = engines
    device.reset_stage_times()
    stages = ("inputs", "ahead", "generate", "outputs", "vision", "prefill", "decode", "compile")
    assert device.stage_times() == dict.fromkeys(stages, 0.0)
    device.generate(_batch()[:2])
    times = device.stage_times()
    assert times["inputs"] > 0 and times["generate"] > times["outputs"] > 0
    assert times["ahead"] == 0  # prepared inline: on the model's path
    # inside generate: the vision tower within the prefill, then the decode
    assert 0 < times["vision"] < times["prefill"] < times["generate"] and times["decode"] > 0


def test_patches_of_a_known_image():
    """One 28x28 image of known pixels: patch order (2x2 merge), channel-major features, each
    patch repeated over the two frames, and (x / 255 - mean) / std."""

    class Processor:  # the constants of Qwen2-VL's preprocessor_config.json
        patch_size, merge_size, temporal_patch_size = 14, 2, 2
        do_rescale, rescale_factor, do_normalize = True, 1 / 255, True
        image_mean, image_std = [0.5, 0.25, 0.0], [0.5, 0.5, 1.0]

    pixels = np.zeros((28, 28, 3), np.uint8)
    pixels[:14, 14:, 0] = 255  # top-right patch: red channel full
    pixels[14:, :14, 2] = 51  # bottom-left patch: blue 0.2
    inputs = ImageInputs(Processor(), torch.device("cpu"), torch.float32)
    values, grid = inputs([Image.fromarray(pixels)])
    assert grid.tolist() == [[1, 2, 2]]
    assert values.shape == (4, 3 * 2 * 14 * 14)
    per = values.reshape(4, 3, 2, 14 * 14)  # patch, channel, frame, pixel
    assert torch.equal(per[:, :, 0], per[:, :, 1])  # the two frames are the same
    # Patches in row-major order within the 2x2 merge window: TL, TR, BL, BR.
    red, green, blue = (0 - 0.5) / 0.5, (0 - 0.25) / 0.5, 0.0
    expect = {
        0: (red, green, blue),
        1: ((1 - 0.5) / 0.5, green, blue),
        2: (red, green, pytest.approx(0.2)),
        3: (red, green, blue),
    }
    for patch, channels in expect.items():
        for c, value in enumerate(channels):
            assert per[patch, c].unique().tolist() == [pytest.approx(value)]


def test_an_image_off_the_grid_is_refused():
    class Processor:
        patch_size, merge_size, temporal_patch_size = 14, 2, 2
        do_rescale, rescale_factor, do_normalize = True, 1 / 255, False
        image_mean = image_std = None

    inputs = ImageInputs(Processor(), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="not on the 28-pixel grid"):
        inputs([_image(56, 50, 0)])


def test_an_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match=r"engine\.hf\.preprocess"):
        HFEngineConfig(preprocess="gpu")
