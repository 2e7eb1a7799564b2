"""Durable state: what the daemon must remember across a restart (the journal).

It sits below ``policy`` and ``failover``, which both read it, and imports nothing of
theirs.
"""
