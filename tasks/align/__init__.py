"""The alignment stage: settings (config.py), SFT, DPO and GRPO (sft.py, dpo.py, grpo.py) and the Prefect task
that runs them in order and registers each (task.py)."""
