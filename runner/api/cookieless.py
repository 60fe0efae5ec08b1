"""httpx's client, keeping no cookies.

bem sets none and the runner sends none, yet httpx's client reads every answer for cookies to
keep, building a ``urllib`` request and response around it each time: about a twelfth of what
sending a POST costs the runner. This client's jar keeps nothing an answer sets.
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["CookielessClient", "NoCookies"]


class NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing an answer sets."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class CookielessClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` whose cookie jar is a :class:`NoCookies`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._kept_none = NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._kept_none

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        raise TypeError("this client keeps no cookies")
