"""The TensorRT-LLM engine (``engine.name: trtllm``, LLM API, PyTorch backend) as a package:
``engine`` (one event loop thread submits every request and awaits its result, as trtllm-bench
does: upstream's submit path is not thread-safe), ``api`` (``LLM(...)``, ``SamplingParams``,
guided decoding), ``prompts`` (chat template, EOS ids, image token), ``outputs`` (a finished
request as a Result), ``faults`` (a row's failure or a dead executor; README "How the
``trtllm`` engine meets TensorRT-LLM 1.2's failures").

Every TensorRT-LLM name used is listed in ``tests/data/trtllm_api_surface.json`` (read from
upstream source); ``tests/engines/test_trtllm_contract.py`` runs the engine against a stand-in
built from that file, as harsh as 1.2 where it fails. tensorrt_llm is imported lazily.
"""
