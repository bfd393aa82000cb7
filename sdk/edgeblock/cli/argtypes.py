"""Argument types shared by the `edgeblock` subcommands: comma-separated lists of blocks, rows and numbers.

argparse calls them on the flag's text; a bad value becomes argparse's usage error (exit code 2).
"""

from __future__ import annotations

import argparse


def blocks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks wants comma-separated block indices like 3,4; got {text!r}")


def rows(text: str) -> tuple[str, ...]:
    """Row names for `eval --rows`; the benchmark's config checks them (a clear error names the valid ones)."""
    return tuple(r.strip() for r in text.split(",") if r.strip())


def seeds(text: str) -> tuple[int, ...]:
    """`eval --seeds 0,1,2`: distinct non-negative whole numbers."""
    try:
        out = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds wants comma-separated whole numbers like 0,1,2; got {text!r}")
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise argparse.ArgumentTypeError(f"--seeds wants distinct seeds >= 0, got {text!r}")
    return out


def sizes(text: str) -> tuple[tuple[int, int], ...]:
    """`compile --gen-sizes 64x48,48x64,96`: WIDTHxHEIGHT or SIDE (a square), comma-separated, positive."""
    out = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        w, sep, h = part.partition("x")
        try:
            size = (int(w), int(h if sep else w))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--gen-sizes wants WIDTHxHEIGHT or SIDE, comma-separated, like "
                                             f"64x48,48x64; got {part!r}") from None
        if min(size) <= 0:
            raise argparse.ArgumentTypeError(f"--gen-sizes wants positive sizes, got {part!r}")
        out.append(size)
    if not out:
        raise argparse.ArgumentTypeError(f"--gen-sizes is empty: {text!r}")
    return tuple(out)


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value
