"""The transformers engine (``engine.name: hf``) as a package: ``engine`` (the engine and its
batch), ``loading`` (model directory and processor), ``inputs`` (pixels on the device),
``vision`` (the dense vision tower), ``decode`` (static caches, compiled decode), ``gqa``
(grouped decode attention), ``guided`` (xgrammar), ``clock`` (stage clocks), ``inflight`` and
``running`` (the in-flight schedule, ``engine.hf.schedule: inflight``), ``build`` (the
registry's builder: either schedule). Heavy imports:
import a module of it only to build or test the engine."""
