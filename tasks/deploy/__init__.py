"""The deploy stage: settings (config.py), ONNX export and quantization (onnx_export.py), held-out measurement
(evaluate.py), transformers and GGUF exports (hugging_face.py, gguf.py, llama_cpp.py) and the Prefect tasks that
register the candidate and gate it (task.py)."""
