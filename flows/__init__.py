"""Prefect flows and the `trainonce` CLI. Importing this package first checks that our other top-level packages
(`models`, `tasks`, `registry`, `serving`: generic names) are this checkout's, not another project's
(flows/own_packages.py), before any of them is imported, and makes CPU threads stop spinning soon (flows/cpu_threads.py)
before torch is loaded."""

from flows.cpu_threads import spin_briefly
from flows.own_packages import check_own_packages

spin_briefly()
check_own_packages()
