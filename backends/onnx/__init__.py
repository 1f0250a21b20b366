"""The ONNX Runtime backend: qir functions lowered to ONNX models (opset 21) and run with ONNX Runtime.

* :func:`qir.backends.onnx.lower.lower_function` -- one qir function to an ``onnx.ModelProto``.
* :mod:`qir.backends.onnx.runtime` -- session creation (CPU, or CANN when ``onnxruntime-cann`` is installed)
  and running a lowered artifact.
* :mod:`qir.backends.onnx.legality` -- the ``ort-ascend`` pre-flight check.
"""
