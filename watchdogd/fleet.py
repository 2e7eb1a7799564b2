"""The fleet's vote: what each watcher publishes, and when the leader may act on it.
Pure: no I/O, no clock reads (every time is passed in, the leader's own monotonic time).

Every watcher publishes a ``View`` each probe cycle (``watchdogd.state.votes``). The
leader reads them all with one linearizable read and tallies them:

- **Freshness is the leader's own.** ``Freshness.saw`` records the leader's receive
  time of a view only when its store revision changed (a republished view always has a
  new revision). A view is fresh while that last change was seen within ``max_age``.
  The sender's clock and its ``seq`` are never trusted for time. The first sighting of
  a view is a baseline, not a change: its age is unknown (it may have been published up
  to a lease ttl ago by a watcher since cut off), so it counts only from the next
  change the leader sees (one probe interval later for a watcher that is alive).
- **A strict majority of the configured voters** (``len(voters) // 2 + 1``), judged
  fresh, must see the primary down. Silence is never a vote: a voter whose view is
  stale, missing or unreadable counts as not seeing it down. Instances that are not
  configured voters are ignored.
- **A veto**: any fresh voter whose view says the primary is up and writable refuses
  the failover (a primary alive in a site the others cannot see is not promoted over).
- **One config**: a fresh voter whose config digest differs from the leader's refuses
  automatic failover (the fleet would not agree on what to do).

- **Vouching**: a watcher tells the guard beside the primary that it sees it healthy
  (``Vouching``); its views say how long ago it last did (``vouch_age``), and
  ``vouch_end`` bounds when a majority last may have, for the leader's wait.

``timing_problem`` checks the rule ``renew interval + 2 * retry budget + margin <= ttl``
and ``authority_deadline`` is when a leader's authority ends: the send time of its last
acknowledged renewal plus the ttl minus the margin.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from watchdogd.core.model import Config
from watchdogd.detector import Status

# The longest outage a view may report (about 31 years): a bigger number is not a time.
MAX_OUTAGE = 10**9

# Fields a view may leave out (a watcher of an earlier version does not send them).
_OPTIONAL = frozenset({"vouch_age"})

# Longest text quoted from a peer's value in an error: errors stay one line and short.
_QUOTE = 60


def _quote(value: object) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= _QUOTE else text[: _QUOTE - 1] + "…"


@dataclass(frozen=True)
class View:
    """What one watcher publishes each probe cycle."""

    instance: str
    seq: int  # grows with every publish of this instance
    primary: str  # node name this watcher treats as primary
    primary_down: bool  # its detector's verdict is DOWN for the primary
    primary_writable: bool | None  # its last direct probe: up and writable / not / unknown
    outage: float  # seconds its detector has seen the primary down
    standby_ok: bool | None  # the standby answers and replicates, by its probes
    config: str  # config_digest() of its config
    # Seconds since this watcher last vouched for its primary to the guard (or since its
    # process started, when it has not since: an earlier one may have). None: unknown
    # (a watcher that does not say), so it never bounds the guard's last sign of life.
    vouch_age: float | None = None

    def encode(self) -> dict[str, Any]:
        """The fields, leaving out an optional one that is None: a watcher of an earlier
        version refuses a view with a field it does not know."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if not (f.name in _OPTIONAL and getattr(self, f.name) is None)
        }

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> View:
        """A view from a peer's published value; ``ValueError`` (one line) naming what is
        wrong: not an object, a missing or unknown field, a field of the wrong type."""
        if not isinstance(data, Mapping):
            raise ValueError(f"view: expected an object, not {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise ValueError(f"view: unknown field {_quote(unknown[0])}")
        missing = [n for n in names if n not in data and n not in _OPTIONAL]
        if missing:
            raise ValueError(f"view: missing field {missing[0]!r}")
        for name in ("instance", "primary", "config"):
            value = data[name]
            if not isinstance(value, str) or not value or len(value) > 256:
                raise ValueError(f"view: {name} must be a non-empty text, not {_quote(value)}")
        seq = data["seq"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ValueError(f"view: seq must be a whole number >= 0, not {_quote(seq)}")
        if not isinstance(data["primary_down"], bool):
            raise ValueError(f"view: primary_down must be true or false, not "
                             f"{_quote(data['primary_down'])}")  # fmt: skip
        for name in ("primary_writable", "standby_ok"):
            value = data[name]
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"view: {name} must be true, false or null, not {_quote(value)}")
        outage = data["outage"]
        if (
            not isinstance(outage, int | float)
            or isinstance(outage, bool)
            or (isinstance(outage, float) and not math.isfinite(outage))
            or not 0 <= outage <= MAX_OUTAGE  # exact for any int: no float conversion
        ):
            raise ValueError(f"view: outage must be a number of seconds >= 0, not "
                             f"{_quote(outage)}")  # fmt: skip
        vouch_age = data.get("vouch_age")
        if vouch_age is not None and (
            not isinstance(vouch_age, int | float)
            or isinstance(vouch_age, bool)
            or (isinstance(vouch_age, float) and not math.isfinite(vouch_age))
            or not 0 <= vouch_age <= MAX_OUTAGE
        ):
            raise ValueError(f"view: vouch_age must be a number of seconds >= 0 or null, not "
                             f"{_quote(vouch_age)}")  # fmt: skip
        return cls(
            instance=data["instance"],
            seq=seq,
            primary=data["primary"],
            primary_down=data["primary_down"],
            primary_writable=data["primary_writable"],
            outage=float(outage),
            standby_ok=data["standby_ok"],
            config=data["config"],
            vouch_age=None if vouch_age is None else float(vouch_age),
        )


class Freshness:
    """The leader's own receive times of each instance's views.

    ``saw(instance, revision, now)`` is called for every view the leader reads, with the
    store's revision of it and the leader's monotonic time. Only a revision different
    from the last one recorded is a change; the first sighting of an instance is a
    baseline (when it changed is unknown), so it is not fresh until a later change.
    For its own view, the leader passes the view's ``seq`` as the revision."""

    def __init__(self, max_age: float) -> None:
        if not max_age > 0 or not math.isfinite(max_age):
            raise ValueError(f"freshness: max_age must be a positive number, not {max_age!r}")
        self.max_age = max_age
        self._revision: dict[str, int] = {}
        self._changed: dict[str, float] = {}

    def saw(self, instance: str, revision: int, now: float) -> None:
        last = self._revision.get(instance)
        if last == revision:
            return
        self._revision[instance] = revision
        if last is not None:
            self._changed[instance] = now

    def age(self, instance: str, now: float) -> float | None:
        """Seconds since the leader saw this instance's view change; None: never seen to."""
        changed = self._changed.get(instance)
        return None if changed is None else max(0.0, now - changed)

    def fresh(self, instance: str, now: float) -> bool:
        age = self.age(instance, now)
        return age is not None and age <= self.max_age

    def forget(self, instance: str) -> None:
        """Drop what is known of ``instance`` (its view is gone from the store)."""
        self._revision.pop(instance, None)
        self._changed.pop(instance, None)

    def forget_others(self, keep: str) -> None:
        """Drop what is known of every instance but ``keep`` (the leader's own view, which
        is its probe of this cycle): each other view is a baseline again."""
        for instance in [i for i in self._revision if i != keep]:
            self.forget(instance)


@dataclass(frozen=True)
class Tally:
    voters: tuple[str, ...]
    fresh: tuple[str, ...]
    down: tuple[str, ...]  # fresh voters whose view says primary_down
    vetoes: tuple[str, ...]  # fresh views saying the primary is up and writable
    mismatched: tuple[str, ...]  # fresh voters whose config digest differs from ours
    needed: int  # strict majority of len(voters)

    def refusal(self) -> str | None:
        """Why the fleet does not allow an automatic failover (one line), or None."""
        if self.mismatched:
            return "automatic failover refused: voters run different configs: " + ", ".join(
                self.mismatched
            )
        if self.vetoes:
            return (
                "vetoed: the primary is up and writable as seen from "
                + ", ".join(self.vetoes)
                + " (a primary alive in a site the others cannot see is not promoted over)"
            )
        if len(self.down) < self.needed:
            stale = [v for v in self.voters if v not in self.fresh]
            seen = ", ".join(self.down) if self.down else "none"
            extra = f"; no fresh view from {', '.join(stale)}" if stale else ""
            return (
                f"only {len(self.down)} of {len(self.voters)} voters see the primary down "
                f"({self.needed} needed; down: {seen}{extra})"
            )
        return None


def tally(
    views: Mapping[str, View],
    freshness: Freshness,
    voters: Sequence[str],
    config: str,
    now: float,
    *,
    primary: str | None = None,
) -> Tally:
    """The fleet's verdict on failing over now. ``views`` maps instance to its latest
    decoded view (the leader's own included); a view filed under another instance's name
    is ignored. With ``primary``, a view about another primary does not count as down;
    a fresh voter that sees its primary up and writable vetoes whichever node it names
    (the fleet disagreeing on roles is no time to promote)."""
    configured = tuple(dict.fromkeys(voters))
    fresh: list[str] = []
    down: list[str] = []
    vetoes: list[str] = []
    mismatched: list[str] = []
    for name in configured:
        view = views.get(name)
        if view is None or view.instance != name or not freshness.fresh(name, now):
            continue
        fresh.append(name)
        if view.config != config:
            mismatched.append(name)
        if view.primary_down and (primary is None or view.primary == primary):
            down.append(name)
        if not view.primary_down and view.primary_writable is True:
            vetoes.append(name)
    return Tally(
        voters=configured,
        fresh=tuple(fresh),
        down=tuple(down),
        vetoes=tuple(vetoes),
        mismatched=tuple(mismatched),
        needed=len(configured) // 2 + 1,
    )


class Vouching:
    """Whether this watcher vouches for its primary to the guard beside it (``GET
    /vouch``): "I see your primary healthy, you are not cut off". A guard counts a
    strict majority of voters vouching as a sign of life, so for the leader to know when
    an isolated guard has fenced, every vouch must be bounded by what the watcher
    published (``View.vouch_age``). Pure: every time is passed in.

    - It vouches only while its last probe cycle (at most ``stale_after`` ago) found the
      primary HEALTHY (no outage running, no stall), for the node it treats as primary.
    - Once its verdict was DOWN it stops (**revoked**), and starts again only after a
      later cycle found the primary healthy, published that view (the store took it)
      and then read the fleet's journal with no failover unfinished (``confirm``). So a
      watcher whose view said "down" never vouches again unseen: either its "up" view
      reached the store before a failover started (and the leader reads it), or it sees
      the failover and stays silent. A new process starts revoked (a restart forgets).
    - ``last`` is when it last vouched, or the process's start (an earlier process may
      have vouched until then): ``age`` goes into every view.
    """

    def __init__(self, start: float, stale_after: float) -> None:
        self.last = start
        self.stale_after = stale_after
        self.revoked = True
        self.why = "not yet confirmed through the store since this watcher started"
        self._healthy = False
        self._cycle_at: float | None = None
        self._primary: str | None = None

    def cycle(self, at: float, status: Status, primary: str) -> None:
        """A probe cycle's verdict (before its view is built and published)."""
        if self._primary is not None and primary != self._primary:
            self.revoked, self.why = True, f"the primary changed to {primary}"
        if status == Status.DOWN:
            self.revoked, self.why = True, "this watcher saw the primary down"
        self._healthy = status == Status.HEALTHY
        self._cycle_at, self._primary = at, primary

    def confirm(self, published_healthy: bool, failover_unfinished: bool) -> None:
        """After this cycle's view was taken by the store, a read of the journal made
        after it: ``failover_unfinished`` says whether it shows a failover not finished."""
        if self.revoked and published_healthy and self._healthy and not failover_unfinished:
            self.revoked, self.why = False, ""

    def ask(self, node: str, now: float) -> tuple[bool, str]:
        """Does it vouch for ``node`` now; why not. A yes is recorded as the last vouch."""
        yes, why = self.would(node, now)
        if yes:
            self.last = max(self.last, now)
        return yes, why

    def would(self, node: str, now: float) -> tuple[bool, str]:
        """``ask`` without recording a vouch (for status)."""
        if self._primary is None or self._cycle_at is None:
            return False, "not probed yet"
        if node != self._primary:
            return False, f"{node} is not the primary here ({self._primary} is)"
        if self.revoked:
            return False, f"not vouching: {self.why}"
        if not self._healthy:
            return False, f"the primary {node} is not healthy as seen from here"
        if now - self._cycle_at > self.stale_after:
            return False, f"the last probe cycle was {now - self._cycle_at:.1f}s ago"
        return True, f"the primary {node} is healthy as seen from here"

    def age(self, now: float) -> float:
        """Seconds since the last vouch, in whole milliseconds rounded down: a shorter
        age dates the last vouch later, never earlier, than it was."""
        return math.floor(max(0.0, now - self.last) * 1000) / 1000


def vouch_end(
    views: Mapping[str, View],
    seen_at: Mapping[str, float],
    freshness: Freshness,
    asked: Sequence[str],
    needed: int,
    now: float,
    primary: str,
) -> tuple[float | None, str]:
    """The latest time (the leader's clock) at which ``needed`` of the watchers
    ``asked`` (the guard's list) may have vouched for ``primary`` to its guard, or None
    and why it cannot be told.

    A watcher is known silent since ``seen_at - vouch_age`` when its view is fresh, says
    the primary down and names a ``vouch_age`` (``seen_at``: the leader's read that
    first showed that view, no earlier than its publish). It vouches no more after
    that (``Vouching``: a "down" view revokes it until a later healthy view reached the
    store). ``needed`` vouching needs one of any ``len(asked) - needed + 1`` of them, so
    once that many are silent, the guard counts no more: the bound is the
    ``(len(asked) - needed + 1)``-th earliest silence (the second of three for a
    majority). A guard that can never count (``needed`` more than it asks) has no bound
    to wait for: minus infinity."""
    names = tuple(dict.fromkeys(asked))
    silent_needed = len(names) - needed + 1
    if silent_needed <= 0:
        return -math.inf, ""
    ends: list[float] = []
    for name in names:
        view = views.get(name)
        if (
            view is None
            or view.instance != name
            or not freshness.fresh(name, now)
            or not view.primary_down
            or view.primary != primary
            or view.vouch_age is None
            or name not in seen_at
        ):
            continue
        ends.append(seen_at[name] - view.vouch_age)
    if len(ends) < silent_needed:
        return None, (
            f"{len(ends)} of the {len(names)} watchers the guard asks are known to have "
            f"stopped vouching for {primary} ({silent_needed} needed)"
        )
    ends.sort()
    return ends[silent_needed - 1], ""


def authority_deadline(renewal_sent: float, ttl: float, margin: float) -> float:
    """When a leader's authority ends: the send time of its last acknowledged renewal
    (etcd renewed no earlier than that) plus the ttl, minus the safety margin."""
    return renewal_sent + ttl - margin


def timing_problem(
    renew_interval: float, retry_budget: float, margin: float, ttl: float
) -> str | None:
    """The rule ``renew interval + 2 * retry budget + margin <= ttl`` (a renewal that
    fails once can still be retried before the lease ends), or what breaks it."""
    named = {
        "renew interval": renew_interval,
        "retry budget": retry_budget,
        "margin": margin,
        "ttl": ttl,
    }
    for name, value in named.items():
        if not math.isfinite(value) or value < 0:
            return f"timing: {name} must be a number >= 0, not {value!r}"
    total = renew_interval + 2 * retry_budget + margin
    if total > ttl:
        return (
            f"timing: renew interval {renew_interval:g}s + 2 * retry budget "
            f"{retry_budget:g}s + margin {margin:g}s = {total:g}s is more than the ttl "
            f"{ttl:g}s"
        )
    return None


def config_digest(cfg: Config) -> str:
    """A short stable hash of the settings the fleet must agree on to decide alike:
    the cluster, the nodes and their roles, the failover rules, the probe timing, the
    voters and the failover and fence steps (names and actions, in order). Never
    secrets, never the instance's own name."""
    fo = cfg.failover
    store = getattr(cfg, "store", None)
    voters = getattr(store, "voters", ()) if store is not None else ()
    relevant = {
        "v": 1,
        "cluster": cfg.cluster,
        "nodes": {"primary": cfg.primary.name, "standby": cfg.standby.name},
        "failover": {
            "mode": fo.mode,
            "outage_threshold": fo.outage_threshold,
            "max_lag": fo.max_lag,
            "max_lag_seconds": fo.max_lag_seconds,
            "cooldown": fo.cooldown,
        },
        "probe": {"interval": cfg.probe.interval, "timeout": cfg.probe.timeout},
        "voters": sorted(voters),
        "steps": [[s.name, s.action] for s in fo.steps],
        "fence_steps": [[s.name, s.action] for s in fo.fence_steps],
    }
    guard = getattr(cfg, "guard", None)  # a leader without it promotes unguarded
    if guard is not None:
        guarded: dict[str, Any] = {"isolation_timeout": guard.isolation_timeout}
        if guard.watchers:  # whether the guard counts vouches changes the leader's wait
            guarded["watchers"] = sorted(name for name, _ in guard.watchers)
        relevant["guard"] = guarded
    text = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
