"""The models one server serves: the members of a family cut from one elastic run (each a registered
`trainonce-chat...` model followed on its own alias), behind one endpoint.

A request names a member (`model`), or gives a latency budget (`max_ms_per_token` in the body, or the
`X-Max-Ms-Per-Token` header) and is routed to the best member that fits: the slowest whose measured decode
latency is within the budget, since in a family the larger members are the slower and the better ones.
Each member moves on its own alias, so promoting one swaps only that one.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.model_source import LoadedModel, ModelSource


@dataclass(frozen=True)
class Routed:
    source: ModelSource
    loaded: LoadedModel  # taken once: the request finishes on this version even if the alias moves


class Family:
    def __init__(self, sources: list[ModelSource]) -> None:
        if not sources:
            raise ValueError("a server needs at least one model")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"each model may be served once; got {names}")
        self.sources = sources

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def named(self, requested: str) -> Routed | None:
        """The member `requested` names: its name, its `name@alias` or `name/version` reference."""
        for source in self.sources:
            loaded = source.current
            if requested in (source.name, source.reference, f"{source.name}/{loaded.version}"):
                return Routed(source, loaded)
        return None

    def within(self, max_ms_per_token: float) -> Routed | None:
        """The slowest member (the largest, the best) whose measured latency fits the budget; None if none."""
        # each source's current model read once: a hot swap between two reads could route to a model that was never
        # measured against the budget
        routed = [Routed(s, s.current) for s in self.sources]
        fitting = [r for r in routed if r.loaded.ms_per_token <= max_ms_per_token]
        return max(fitting, key=lambda r: r.loaded.ms_per_token, default=None)

    def fastest(self) -> LoadedModel:
        return min((s.current for s in self.sources), key=lambda loaded: loaded.ms_per_token)

    def start(self) -> None:
        for source in self.sources:
            source.start()

    def stop(self) -> None:
        for source in self.sources:
            source.stop()
