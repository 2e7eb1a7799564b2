"""Test helper: aioresponses for vendor cloud APIs, working with aiohttp 3.14.

aioresponses 0.7.x builds its fake responses without the ``stream_writer`` that
aiohttp 3.14's ``ClientResponse`` requires (pnuckowski/aioresponses#289).
``VendorAPI`` is ``aioresponses`` with every registered response built by a
``ClientResponse`` subclass that supplies one; everything else (``passthrough``,
``requests``, ``callback``) is aioresponses' own. Drop this module once an
aioresponses release fixes the issue.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import aiohttp
from aioresponses import aioresponses
from yarl import URL


class CompatResponse(aiohttp.ClientResponse):
    """A mocked response aiohttp 3.14 accepts: a finished request's writer is only
    asked for its output size."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


class VendorAPI(aioresponses):
    """``aioresponses`` whose registered responses are ``CompatResponse``s."""

    def add(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("response_class", CompatResponse)
        super().add(*args, **kwargs)
