"""Starting from a pretrained Hugging Face MoE: reading and checking its weights (import_hf.py) and the Prefect
task that registers it as the supernet (task.py)."""
