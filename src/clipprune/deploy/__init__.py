"""Deployment: ONNX export checked in ONNX Runtime (``onnx_export``) and the latency lookup table that
``search.metric: latency`` searches under (``latency_table``). Import the submodules directly: the ONNX one
needs ``onnxruntime`` only when it runs."""
