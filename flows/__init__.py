"""Prefect flows and the `trainonce` CLI. Importing this package first checks that our other top-level packages
(`models`, `tasks`, `registry`, `serving`: generic names) are this checkout's, not another project's
(flows/own_packages.py), before any of them is imported, and makes CPU threads wait passively (flows/cpu_threads.py)
before torch is loaded."""

from flows.cpu_threads import wait_passively
from flows.own_packages import check_own_packages

wait_passively()
check_own_packages()
