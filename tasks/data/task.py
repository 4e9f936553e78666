"""The data stage's Prefect task: prepare (or reuse) the dataset the later stages read by path."""

from __future__ import annotations

from prefect import task

from tasks.data.config import DataConfig
from tasks.data.corpus import prepare_data


@task(name="prepare-data", retries=2, retry_delay_seconds=[2, 10])
def prepare_data_task(config: DataConfig) -> str:
    """Prepare (or reuse) the dataset; returns its folder, which later tasks load by path."""
    return str(prepare_data(config).directory)
