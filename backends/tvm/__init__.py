"""The TVM backend: qir -> Relax lowering (:mod:`.lower`), schedules (:mod:`.schedule`), artifacts (:mod:`.compile`).

Targets ``tvm-llvm`` (host CPU), ``tvm-arm`` (aarch64, cross-compiled) and ``tvm-cuda`` are described in
``backends/targets/tvm-*.json``. ``apache-tvm`` is imported only when a TVM target is used.
"""
