"""Serving: the OpenAI-compatible server and the MLflow pyfunc that answer chat with the exported ONNX packages."""

from pathlib import Path

# MLflow "model from code" of every `trainonce-chat` version: registry.models.register_chat_package logs this file
CHAT_PYFUNC_CODE = Path(__file__).resolve().with_name("chat_pyfunc.py")
