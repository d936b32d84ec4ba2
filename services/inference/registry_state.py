"""What the registry says about one model, as its watch delivers it, and what to serve.

Events may repeat (a reconnect replays what a snapshot already showed) or arrive out of
order across replicas; each alias remembers the id of the move that set it and each
policy its revision, so an event that is not newer changes nothing and a served model
is never reloaded or rolled back by an old event. The plan is a value: when an event
leaves it equal to what is served, nothing happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelplane.registry.v1 import registry_pb2 as pb


@dataclass(frozen=True, slots=True)
class Rollout:
    routes: tuple[tuple[str, int], ...] = ()
    """(alias, weight percent), weights summing to 100; empty: the followed alias alone."""
    shadow_alias: str = ""
    shadow_percent: int = 0
    revision: int = 0

    @classmethod
    def from_pb(cls, policy: pb.RolloutPolicy) -> Rollout:
        return cls(
            routes=tuple((r.alias, int(r.weight)) for r in policy.routes),
            shadow_alias=policy.shadow.alias,
            shadow_percent=int(policy.shadow.percent),
            revision=int(policy.revision),
        )


@dataclass(frozen=True, slots=True)
class PlannedRoute:
    alias: str
    version: int
    weight: int


@dataclass(frozen=True, slots=True)
class Plan:
    """The versions one server serves for a model, and how requests reach them."""

    routes: tuple[PlannedRoute, ...]
    """The followed alias first."""
    shadow: PlannedRoute | None = None
    """weight = percent of requests mirrored."""

    @property
    def versions(self) -> frozenset[int]:
        shadow = {self.shadow.version} if self.shadow else set()
        return frozenset({route.version for route in self.routes} | shadow)


@dataclass(slots=True)
class ModelState:
    model: str
    aliases: dict[str, tuple[int, int]] = field(default_factory=dict)
    """alias -> (version, id of the move that set it); version 0 marks a deleted alias,
    kept so an older move of it cannot bring it back."""
    rollout: Rollout = Rollout()

    @classmethod
    def from_snapshot(cls, model: str, snapshot: pb.AliasSnapshot) -> ModelState:
        state = cls(model)
        state.aliases = {a.alias: (int(a.version), int(a.event_id)) for a in snapshot.aliases}
        if snapshot.HasField("rollout"):
            state.rollout = Rollout.from_pb(snapshot.rollout)
        return state

    @classmethod
    def from_listing(
        cls, model: str, aliases: list[pb.Alias], policy: pb.RolloutPolicy | None
    ) -> ModelState:
        state = cls(model)
        state.aliases = {a.alias: (int(a.version), int(a.event_id)) for a in aliases}
        if policy is not None:
            state.rollout = Rollout.from_pb(policy)
        return state

    def version_of(self, alias: str) -> int:
        return self.aliases.get(alias, (0, 0))[0]

    def apply_alias_event(self, event: pb.AliasEvent) -> bool:
        """Applies a move if it is newer than what set the alias; True if it changed."""
        current = self.aliases.get(event.alias)
        # An id of 0 comes from a registry that numbers no moves: it cannot be ordered,
        # so it is taken as it comes.
        if current is not None and event.id and event.id <= current[1]:
            return False
        new = (int(event.to_version), int(event.id))
        self.aliases[event.alias] = new
        return current is None or current[0] != new[0]

    def apply_rollout(self, policy: pb.RolloutPolicy) -> bool:
        if policy.revision and policy.revision <= self.rollout.revision:
            return False
        new = Rollout.from_pb(policy)
        changed = new != self.rollout
        self.rollout = new
        return changed

    def plan(self, primary: str) -> Plan | None:
        """What a server following `primary` serves; None when the alias is unset.

        The policy applies when it routes the followed alias (or routes nothing and
        only shadows); a server following an alias the policy does not route serves
        that alias alone. A routed alias that no longer exists gives its weight to the
        followed one (the registry refuses to delete a routed alias, so this is only
        a guard)."""
        holder = self.version_of(primary)
        if not holder:
            return None
        rollout = self.rollout
        routed = {alias for alias, _ in rollout.routes}
        applies = not routed or primary in routed
        routes = [PlannedRoute(primary, holder, 100)]
        if routed and applies:
            spare = 0
            others = []
            for alias, weight in rollout.routes:
                version = self.version_of(alias)
                if alias == primary:
                    continue
                if version:
                    others.append(PlannedRoute(alias, version, weight))
                else:
                    spare += weight
            own = dict(rollout.routes)[primary] + spare
            routes = [PlannedRoute(primary, holder, own), *others]
        shadow = None
        shadow_version = self.version_of(rollout.shadow_alias) if rollout.shadow_alias else 0
        if applies and rollout.shadow_percent > 0 and shadow_version:
            shadow = PlannedRoute(rollout.shadow_alias, shadow_version, rollout.shadow_percent)
        return Plan(tuple(routes), shadow)

    # --- the cached copy -------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "aliases": {alias: list(value) for alias, value in self.aliases.items()},
            "rollout": {
                "routes": [list(route) for route in self.rollout.routes],
                "shadow_alias": self.rollout.shadow_alias,
                "shadow_percent": self.rollout.shadow_percent,
                "revision": self.rollout.revision,
            },
        }

    @classmethod
    def from_json(cls, model: str, data: dict[str, Any]) -> ModelState:
        state = cls(model)
        state.aliases = {
            str(alias): (int(value[0]), int(value[1]))
            for alias, value in dict(data.get("aliases", {})).items()
        }
        rollout = dict(data.get("rollout", {}))
        state.rollout = Rollout(
            routes=tuple((str(a), int(w)) for a, w in rollout.get("routes", [])),
            shadow_alias=str(rollout.get("shadow_alias", "")),
            shadow_percent=int(rollout.get("shadow_percent", 0)),
            revision=int(rollout.get("revision", 0)),
        )
        return state
