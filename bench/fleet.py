"""Fleet failover benchmark (issue 12): three etcd members, three watchers, a real pair.

Each trial builds a fresh PostgreSQL pair (copied from one initdb template) and the two
app stand-ins, and starts three ``watchdogd run`` processes, dc1..dc3, sharing one config
(``watchdogd.demo.sites.SitesLab``: probe interval 1 s, probe timeout 0.5 s, outage
threshold 3 s, ``store.etcd.ttl`` 15 s and ``timeout`` 1 s, the values docs/fleet.md
shows; the five-step sequence, the last step a PUT to a route that records the moment).
One etcd cluster of three members on loopback serves every trial, each trial under its
own key prefix. Once the watchers agree on a leader that sees every voter fresh, the
trial injects its fault at a random phase of the probe cycle and measures:

- ``primary``: the primary lost with the leader elsewhere. SIGKILL the primary database
  -> the standby out of recovery (``pg_is_in_recovery()`` polled every 50 ms) and ->
  traffic switched (the route received the last step's PUT).
- ``leader``: the leader lost together with the primary. SIGKILL the leading watcher
  process and the primary database at the same moment -> the standby promoted (and the
  route switched), by a watcher that had to wait for the dead leader's lease to end.

    .venv/bin/python bench/fleet.py [--trials 5] [--scenario primary|leader|both]
                                    [--ttl 15s] [--threshold 3s] [--json PATH]

Prints p50 / p95 / max per scenario (p95 interpolated between ranks), the goals of
issue 12 (primary: p95 kill -> traffic switched <= threshold + 3 s; leader: kill ->
promoted <= ttl + threshold + 3 s) and Patroni's failover floor as bench/versus_patroni.py
measured it here (issue 13). Exits 2 with one line when PostgreSQL or etcd is missing,
1 when a trial fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from watchdogd.core.units import parse_duration
from watchdogd.demo.etcd import NO_ETCD, EtcdLab, find_etcd
from watchdogd.demo.lab import LabError, find_pg_bin, lab_root, make_template
from watchdogd.demo.sites import NO_POSTGRES, SitesError, SitesLab, SitesSettings

# bench/versus_patroni.py, issue 13, on this machine: kill -> standby out of recovery, p50.
PATRONI_P50 = 19.746


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..100)."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


async def trial(
    settings: SitesSettings, etcd: EtcdLab, scenario: str, number: int
) -> dict[str, Any]:
    lab = SitesLab(settings)
    try:
        await lab.start(etcd=etcd, prefix=f"/bench/{scenario}-{number}-{time.time_ns()}")
        leader = await lab.wait_ready(90.0)
        assert lab.pair is not None and lab.route is not None
        await asyncio.sleep(random.uniform(0, settings.interval))
        watcher = lab.watchers[leader]
        t0 = time.monotonic()
        if scenario == "leader":
            watcher.kill()
        lab.pair.primary.kill()
        within = settings.ttl + settings.threshold + 30.0
        promoted = await lab.until_promoted(within)
        try:
            async with asyncio.timeout(15.0):
                await lab.route.switched.wait()
        except TimeoutError:
            raise SitesError(
                f"no traffic switch within 15s of the promotion: {lab.logs()}"
            ) from None
        switched = lab.route.switches[0][0]
        statuses = await lab.statuses()
        new_leader = lab.leader_of(statuses)
        promotions = await asyncio.to_thread(lab.timeline, lab.pair.standby) - 1
        if promotions != 1:
            raise SitesError(f"{promotions} promotions seen on the standby's timeline")
        return {
            "scenario": scenario,
            "leader_before": leader,
            "leader_after": new_leader,
            "promoted": promoted - t0,
            "switched": switched - t0,
            "promotions": promotions,
        }
    finally:
        await lab.close()


def table(results: dict[str, list[dict[str, Any]]], settings: SitesSettings) -> tuple[str, Any]:
    lines = [
        f"fleet of 3 watchers, 3 etcd members; probe interval {settings.interval:g}s, "
        f"threshold {settings.threshold:g}s, ttl {settings.ttl:g}s, "
        f"etcd timeout {settings.etcd_timeout:g}s",
        f"{'scenario / phase (seconds)':<52}{'n':>3}{'p50':>9}{'p95':>9}{'max':>9}",
    ]
    summary: dict[str, Any] = {}
    labels = {
        ("primary", "promoted"): "primary killed -> standby out of recovery",
        ("primary", "switched"): "primary killed -> traffic switched",
        ("leader", "promoted"): "leader + primary killed -> standby out of recovery",
        ("leader", "switched"): "leader + primary killed -> traffic switched",
    }
    for (scenario, key), label in labels.items():
        rs = results.get(scenario)
        if not rs:
            continue
        values = [r[key] for r in rs]
        p50, p95, mx = percentile(values, 50), percentile(values, 95), max(values)
        summary[f"{scenario}:{key}"] = {"p50": p50, "p95": p95, "max": mx}
        lines.append(f"{label:<52}{len(values):>3}{p50:>9.3f}{p95:>9.3f}{mx:>9.3f}")
    goals: dict[str, bool] = {}
    if "primary:switched" in summary:
        goal = settings.threshold + 3.0
        p95 = summary["primary:switched"]["p95"]
        goals["primary_switched_p95"] = p95 <= goal
        lines.append(
            f"goal primary lost, leader elsewhere: p95 kill -> traffic switched <= "
            f"threshold + 3s = {goal:g}s: {p95:.3f}s ({'met' if p95 <= goal else 'MISSED'})"
        )
    if "leader:promoted" in summary:
        goal = settings.ttl + settings.threshold + 3.0
        worst = summary["leader:promoted"]["max"]
        goals["leader_promoted_max"] = worst <= goal
        lines.append(
            f"goal leader lost with the primary: kill -> promoted <= ttl + threshold + 3s "
            f"= {goal:g}s: max {worst:.3f}s ({'met' if worst <= goal else 'MISSED'})"
        )
    for scenario in ("primary", "leader"):
        if f"{scenario}:promoted" in summary:
            p50 = summary[f"{scenario}:promoted"]["p50"]
            lines.append(
                f"vs Patroni's floor measured here (issue 13, kill -> out of recovery p50 "
                f"{PATRONI_P50:g}s): {scenario} scenario p50 {p50:.3f}s = "
                f"{p50 / PATRONI_P50:.2f}x"
            )
    summary["goals"] = goals
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--scenario", choices=("primary", "leader", "both"), default="both")
    p.add_argument("--ttl", default="15s")
    p.add_argument("--threshold", default="3s")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    try:
        ttl = parse_duration(args.ttl)
        threshold = parse_duration(args.threshold)
    except ValueError as exc:
        p.error(str(exc))
    if args.trials < 1:
        p.error("--trials: must be at least 1")
    if find_pg_bin() is None:
        print(NO_POSTGRES, file=sys.stderr)
        return 2
    if find_etcd() is None:
        print(NO_ETCD, file=sys.stderr)
        return 2
    template = make_template()
    settings = SitesSettings(threshold=threshold, ttl=ttl, template=template)
    scenarios = ("primary", "leader") if args.scenario == "both" else (args.scenario,)
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in scenarios}
    etcd_dir = Path(lab_root()) / f"watchdogd-bench-etcd-{time.time_ns()}"
    etcd: EtcdLab | None = None
    try:
        etcd = EtcdLab.create(etcd_dir)
        for scenario in scenarios:
            for n in range(1, args.trials + 1):
                r = asyncio.run(trial(settings, etcd, scenario, n))
                results[scenario].append(r)
                print(
                    f"{scenario} trial {n}: promoted {r['promoted']:.3f}s, traffic switched "
                    f"{r['switched']:.3f}s after the kill; leader {r['leader_before']} -> "
                    f"{r['leader_after']}",
                    file=sys.stderr,
                    flush=True,
                )
    except (SitesError, LabError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if etcd is not None:
            etcd.close()
        shutil.rmtree(etcd_dir, ignore_errors=True)
        shutil.rmtree(template.parent, ignore_errors=True)
    text, summary = table(results, settings)
    print(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "interval": settings.interval,
                    "threshold": threshold,
                    "ttl": ttl,
                    "etcd_timeout": settings.etcd_timeout,
                    "trials": args.trials,
                    **summary,
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
