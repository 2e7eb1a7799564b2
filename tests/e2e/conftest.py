"""Fixtures for end-to-end tests: the daemon as a real process over real servers."""

from tests.support import closed_port
from tests.support.apps import demo_apps
from tests.support.daemon import daemon_factory
from tests.support.mysql import mariadb_template_dir
from tests.support.pg import pg_pair

__all__ = ["closed_port", "daemon_factory", "demo_apps", "mariadb_template_dir", "pg_pair"]
