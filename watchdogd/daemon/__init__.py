"""The daemon: ``Daemon`` (in ``lifecycle``) builds everything from the config, starts,
serves until a signal and stops; the probe cycle, failovers and fences, operator
commands, reload and the views are modules of their own beside it."""

from watchdogd.daemon.cycle import Latest
from watchdogd.daemon.lifecycle import Daemon

__all__ = ["Daemon", "Latest"]
