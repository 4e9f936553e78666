"""The data stage: the corpus and its tokenizer (corpus.py), the generated instruction tasks (task_mix.py), and
its Prefect task (task.py)."""
