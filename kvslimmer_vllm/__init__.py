"""KVSlimmer KV-cache merging for vLLM.

* :mod:`kvslimmer_vllm.core` - the engine-free math on plain tensors (public API);
* :mod:`kvslimmer_vllm.engine` - every vLLM touch point (loaded as a vLLM plugin);
* :mod:`kvslimmer_vllm.models` - the embedded default model.
"""

__version__ = "0.1.0"
