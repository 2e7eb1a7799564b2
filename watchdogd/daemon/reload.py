"""Reload (SIGHUP or ``watchdogctl reload``): read the config file again and apply what
can change while running; a bad file or a running failover refuses it and keeps the
running config. Sockets and the state directory need a restart (said in the reply).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from watchdogd import config as configmod
from watchdogd import policy
from watchdogd.control import CommandError
from watchdogd.core.model import Config
from watchdogd.daemon.cycle import make_detector
from watchdogd.daemon.schedule import PROBE
from watchdogd.logging import setup_logging
from watchdogd.notify import Notifier

if TYPE_CHECKING:
    from watchdogd.daemon.lifecycle import Daemon


def spawn(d: Daemon) -> None:
    """SIGHUP: reload in the background; a refusal is logged by the reload itself."""

    async def quietly() -> None:
        with contextlib.suppress(CommandError):
            await reload(d, by="SIGHUP")

    task = asyncio.create_task(quietly())
    d.background.add(task)  # a reference until it ends
    task.add_done_callback(d.background.discard)


async def reload(d: Daemon, by: str) -> dict[str, Any]:
    d.systemd.reloading()
    try:
        return await _reload(d, by)
    finally:
        d.systemd.ready(f"{d.policy.state}")


def old_db(config: Config, name: str) -> Any:
    try:
        return config.node(name).database
    except KeyError:
        return None


async def _reload(d: Daemon, by: str) -> dict[str, Any]:
    if d.config.source is None:
        raise CommandError("reload refused: the daemon was not started from a config file")
    try:
        new = configmod.load(d.config.source)
    except configmod.ConfigError as exc:
        d.metrics.config_reloaded(False, d.wall())
        d.emit("reload_refused", by=by, problems=exc.problems)
        raise CommandError(
            "reload refused, running config kept: " + "; ".join(exc.problems)
        ) from None
    if d.sequences.runner is not None:
        raise CommandError("reload refused: a failover is running; reload when it ends")
    if d.sequences.rejoin_runner is not None:  # its steps use the engines a reload replaces
        raise CommandError("reload refused: a rejoin is running; reload when it ends")
    if d.sequences.rejoin_running:  # its divergence report too, and it may start the rejoin
        raise CommandError(
            "reload refused: a rejoin is starting (its divergence report); reload when it ends"
        )
    changed = policy.restart_needed_for(d.config, new)
    old = d.config
    d.config = new
    d.policy.cfg = new.failover
    d.detector = make_detector(new)
    for node in new.nodes:
        if node.name not in d.engines or old_db(old, node.name) != node.database:
            if node.name in d.engines:
                await d.engines[node.name].close()
            d.engines[node.name] = d.make_engine(node, new)
    d.check_roles()
    if d.scheduler is not None and new.probe.interval != old.probe.interval:
        d.scheduler.reschedule(PROBE, new.probe.interval)
    if d.fleet is not None and new.probe != old.probe:
        d.fleet.reset_votes(rebuild=True)  # the freshness window follows the probe interval
    d.secrets.replace(new.secrets)
    if new.log != old.log:
        setup_logging(new.log.format, new.log.level, cluster=new.cluster, secrets=d.secrets)
    if new.webhooks != old.webhooks:
        previous, d.notifier = (
            d.notifier,
            Notifier(new.webhooks, new.cluster, d.log, d.secrets),
        )
        await d.notifier.start()
        await previous.close(2.0)
    d.export_config(new)
    await d.advise()
    d.emit("reloaded", by=by, restart_needed_for=changed or None)
    return {"reloaded": True, "restart_needed_for": changed}
