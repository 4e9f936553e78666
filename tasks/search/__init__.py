"""The search stage: settings (config.py), importance ranking (importance.py), the budgeted search (search.py)
and its Prefect task (task.py)."""
