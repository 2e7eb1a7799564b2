"""The leaves every other layer stands on: the config section reader, the frozen config
model, secrets and masking, units, and the exception base.

Nothing here imports another ``watchdogd`` package: ``core`` is the bottom of the
import graph (the layers are checked by ``lint-imports``; see ``pyproject.toml``).
"""
