"""Every vLLM touch point of kvslimmer-vllm, and nothing else.

* :mod:`.plugin` - the ``vllm.general_plugins`` entry point: CLI flags, start-up checks;
* :mod:`.scheduler` - physical block accounting, merge rounds, freeing tail blocks;
* :mod:`.worker` - model-runner hooks: physical slot mapping, applying rounds;
* :mod:`.attention` - the attention backend that adds log(count) per slot;
* :mod:`.slots` - per-slot side state (count, position, Hessian, observation mass), rounds;
* :mod:`.memory` - what a round may allocate, reserved out of the KV budget;
* :mod:`.metrics` - Prometheus metrics shared across vLLM's processes.
"""
