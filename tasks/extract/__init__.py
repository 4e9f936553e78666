"""The extraction stage: settings (config.py), distillation of the cut sub-model (distill.py) and the Prefect
task that extracts, distils and registers it (task.py)."""
