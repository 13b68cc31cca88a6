"""The transformers engine (``engine.name: hf``) as a package: ``engine`` (the engine and its
batch), ``loading`` (model directory and processor), ``inputs`` (pixels on the device),
``vision`` (the dense vision tower), ``decode`` (static caches, compiled decode), ``gqa``
(grouped decode attention), ``guided`` (xgrammar), ``clock`` (stage clocks). Heavy imports:
import a module of it only to build or test the engine."""
