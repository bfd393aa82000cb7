"""Pages of ListJobs and ListAdapters (Google AIP-158): page_size, an opaque page_token that names the
last item of the previous page, and next_page_token. Tokens are signed with a key of this daemon's
run, so one it did not issue (or one from before a restart) is refused instead of misread."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from .errors import InvalidArgument

T = TypeVar("T")


class Pager:
    """Cuts a sorted list into pages. `key(item)` orders the items (ascending) and must be unique per item:
    a page continues after the last item of the previous one, so items added or removed between calls
    neither repeat nor shift the pages."""

    def __init__(self, max_page_size: int, secret: bytes | None = None):
        if max_page_size < 1:
            raise ValueError(f"max_page_size must be at least 1, got {max_page_size}")
        self.max_page_size = int(max_page_size)
        self._secret = secret or os.urandom(32)

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._secret, payload, hashlib.sha256).hexdigest()[:32]

    def _token(self, what: str, cursor: list) -> str:
        payload = json.dumps([what, cursor], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(payload).decode().rstrip("=") + "." + self._sign(payload)

    def _cursor(self, what: str, token: str) -> list:
        bad = InvalidArgument(f"page_token {token[:80]!r} was not issued by this daemon for {what} (tokens do not "
                              "survive a daemon restart): start again from the first page")
        body, _, sig = token.partition(".")
        try:
            payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (ValueError, TypeError):
            raise bad from None
        if not hmac.compare_digest(self._sign(payload), sig):
            raise bad
        kind, cursor = json.loads(payload)
        if kind != what:
            raise bad
        return cursor

    def page(self, what: str, items: Sequence[T], key: Callable[[T], list], page_size: int, page_token: str,
             newest_first: bool = False) -> tuple[list[T], str]:
        """(the page's items, next_page_token or ""). `what` names the list, so a token of one list is refused
        by another; newest_first walks the items in descending key order."""
        if page_size < 0:
            raise InvalidArgument(f"page_size must be >= 0, got {page_size}")
        size = min(int(page_size) or self.max_page_size, self.max_page_size)
        ordered = sorted(items, key=key, reverse=newest_first)
        if page_token:
            after = self._cursor(what, page_token)
            ordered = [it for it in ordered if (key(it) < after if newest_first else key(it) > after)]
        out = ordered[:size]
        more = len(ordered) > size
        return out, (self._token(what, key(out[-1])) if more else "")
