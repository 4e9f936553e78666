"""Which model the server runs: a registered `trainonce-chat` alias (or fixed version), followed as it moves.

A background thread re-resolves the alias every `poll_seconds`. When it points at a new version, that
version is downloaded and loaded *beside* the current one, then swapped in with one reference assignment:
requests already running keep the model they started with, new requests get the new one, none is dropped.
If the registry cannot be reached or the new version fails to load, the current model keeps serving.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from registry.models import RegisteredVersion, download_chat_package, resolve_version, version_cache_dir
from serving.batching import DEFAULT_BATCHING, Batching, DecodeBatcher
from serving.engine import EVERY_TOKEN, ChatPackage

log = logging.getLogger("trainonce.serving")


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    package: ChatPackage
    loaded_at: int  # Unix seconds: the model card's `created`
    batcher: DecodeBatcher
    ms_per_token: float  # measured at load on this machine: greedy decoding, batch 1 (latency routing)


def decode_latency_ms(package: ChatPackage, new_tokens: int = 16, repeats: int = 3) -> float:
    """Median milliseconds per generated token, batch 1, after one warm-up: what a request's decoding costs
    on this machine, so that a latency budget can be met by choosing a member that fits."""
    prompt = package.text_prompt("The king")[: max(1, package.config.max_seq_len - new_tokens)]
    budget = min(new_tokens, package.room_for(prompt))
    package.complete(prompt, budget, EVERY_TOKEN)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        package.complete(prompt, budget, EVERY_TOKEN)
        timings.append((time.perf_counter() - start) * 1000 / budget)
    return statistics.median(timings)


class ModelSource:
    def __init__(
        self,
        workdir: str | Path,
        name: str,
        alias: str | None,
        version: str | None,
        cache_dir: str | Path,
        poll_seconds: float = 5.0,
        threads: int = 0,
        batching: Batching = DEFAULT_BATCHING,
    ) -> None:
        if (alias is None) == (version is None):
            raise ValueError("give exactly one of alias and version")
        self.workdir, self.name, self.alias, self.pinned_version = str(workdir), name, alias, version
        self.cache_dir, self.poll_seconds, self.threads = Path(cache_dir), poll_seconds, threads
        self.batching = batching
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current = self._load(self._resolve())  # fails loudly at start-up: nothing to serve otherwise

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.pinned_version}"

    def _resolve(self) -> RegisteredVersion:
        return resolve_version(self.workdir, self.reference)

    def _load(self, registered: RegisteredVersion) -> LoadedModel:
        version = registered.version
        destination = version_cache_dir(self.cache_dir, self.workdir, registered)
        package_dir = download_chat_package(self.workdir, f"{self.name}/{version}", destination)
        package = ChatPackage(package_dir, threads=self.threads, spin=False)  # a server's cores are shared
        batcher = DecodeBatcher(package, self.batching)
        return LoadedModel(self.name, version, package, int(time.time()), batcher, decode_latency_ms(package))

    def refresh(self) -> bool:
        """Swap to the version the alias names now, if it moved; True if a swap happened."""
        registered = self._resolve()
        if registered.version == self.current.version:
            return False
        loaded = self._load(registered)
        previous, self.current = self.current.version, loaded
        log.warning("%s moved: now serving version %s (was %s)", self.reference, registered.version, previous)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:  # registry down, download or load failed: keep serving what we have
                log.exception("could not refresh %s; still serving version %s", self.reference, self.current.version)

    def start(self) -> None:
        if self.alias is not None and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="alias-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_seconds + 5)
