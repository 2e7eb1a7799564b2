"""Fixtures for integration tests (real servers, started per test)."""

from tests.support import closed_port
from tests.support.apps import demo_apps
from tests.support.etcd import etcd
from tests.support.mysql import mariadb_template_dir
from tests.support.pg import pg_pair

__all__ = ["closed_port", "demo_apps", "etcd", "mariadb_template_dir", "pg_pair"]
