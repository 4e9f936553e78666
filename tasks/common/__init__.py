"""Pieces every stage shares: the optimiser and schedules, throughput accounting, plots, the launcher of
several processes, what a loop logs to (tracker.py), and the results each stage hands the next."""
