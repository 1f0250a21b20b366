"""Backends that lower qir to runtimes (installed as ``qir.backends``).

Targets (``reference``, ``ort-cpu``, ``ort-ascend``, ``tvm-llvm``, ``tvm-arm``,
``tvm-cuda``) arrive with their issues. Today the reference interpreter
(:mod:`qir.interpreter`) is the only way to run a module.
"""
