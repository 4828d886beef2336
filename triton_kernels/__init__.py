"""Triton GPU kernels of kvslimmer-vllm, installed as ``kvslimmer_vllm.triton_kernels``.

Import them through :mod:`kvslimmer_vllm.kernels`, which picks the implementation for
the device. (This folder is mapped into the package by setup.py; it is not a top-level
``triton_kernels`` package and must not be put on ``sys.path`` directly.)
"""
