"""Pages of ListJobs/ListAdapters (edge_runtime.daemon.paging): every item exactly once across pages, stable under
inserts between calls, and tokens that are refused when forged, stale or from another list."""

from __future__ import annotations

import pytest

from edge_runtime.daemon.errors import InvalidArgument
from edge_runtime.daemon.paging import Pager


def _walk(pager, items, size, newest_first=False, what="jobs"):
    out, token, pages = [], "", 0
    while True:
        page, token = pager.page(what, items, lambda x: [x[0], x[1]], size, token, newest_first=newest_first)
        out += page
        pages += 1
        if not token:
            return out, pages


@pytest.mark.parametrize("newest_first", [False, True])
@pytest.mark.parametrize("size", [0, 1, 3, 7, 100])
def test_every_item_once_in_order(size, newest_first):
    items = [(float(t % 4), f"{i:02d}") for i, t in enumerate(range(10))]  # equal times: the id breaks ties
    pager = Pager(max_page_size=4)
    got, pages = _walk(pager, items, size, newest_first)
    assert got == sorted(items, reverse=newest_first)
    assert pages == -(-10 // min(size or 4, 4))  # page_size 0 and beyond the maximum: max_page_size


def test_items_added_between_pages_neither_repeat_nor_shift():
    items = [(float(i), f"{i:02d}") for i in range(6)]
    pager = Pager(max_page_size=10)
    first, token = pager.page("jobs", items, list, 3, "", newest_first=True)
    assert [x[1] for x in first] == ["05", "04", "03"]
    items = items + [(99.0, "new")]  # a newer job arrives: it is on no later page of this walk
    rest, token = pager.page("jobs", items, list, 3, token, newest_first=True)
    assert [x[1] for x in rest] == ["02", "01", "00"] and token == ""


def test_tokens_are_refused_when_forged_stale_or_of_another_list():
    items = [(float(i), f"{i:02d}") for i in range(5)]
    pager = Pager(max_page_size=2)
    _, token = pager.page("jobs", items, list, 2, "")
    assert token
    for bad in ("junk", token[:-1] + ("0" if token[-1] != "0" else "1"), "e30." + token.split(".")[1]):
        with pytest.raises(InvalidArgument, match="not issued by this daemon"):
            pager.page("jobs", items, list, 2, bad)
    with pytest.raises(InvalidArgument, match="for adapters"):
        pager.page("adapters", items, list, 2, token)
    with pytest.raises(InvalidArgument, match="restart"):
        Pager(max_page_size=2).page("jobs", items, list, 2, token)  # another run's key
    with pytest.raises(InvalidArgument, match="page_size"):
        pager.page("jobs", items, list, -1, "")
    with pytest.raises(ValueError, match="max_page_size"):
        Pager(max_page_size=0)
