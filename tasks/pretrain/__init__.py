"""The elastic pre-training stage: settings (config.py), which sub-models train at each step (sampling.py), one
step (step.py), the loop (loop.py) with its checkpoints and validation panel, the entry point of each process
(entry.py, `accelerate launch -m tasks.pretrain.entry`) and the Prefect task that registers the supernet (task.py)."""
