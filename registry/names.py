"""The registered models' names, one per kind of model the pipeline versions. A module of its own, without
MLflow, so that configs and algorithm modules can name a registered model without importing the registry client.
"""

SUPERNET_MODEL = "trainonce-supernet"
SUBNET_MODEL = "trainonce-subnet"
CHAT_TORCH_MODEL = "trainonce-chat-torch"  # aligned PyTorch checkpoints (SFT, DPO)
CHAT_MODEL = "trainonce-chat"  # the deployable: ONNX (fp32 / INT8 / INT4) + tokenizer, served by alias
HF_MODEL = "trainonce-chat-hf"  # the same aligned model as a transformers directory (transformers flavor)
