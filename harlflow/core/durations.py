"""Durations as a user writes them (``--time-budget 20m``, ``--interval 1h``) and as a
summary prints them."""

from __future__ import annotations

import math
import re

from harlflow.core.errors import BadInputError

_DURATION = re.compile(r"^\s*(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>s|sec|m|min|h)?\s*$", re.I)
_UNIT_SECONDS = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: str, option: str = "--time-budget") -> float:
    """``"90s"``, ``"20m"``, ``"1h"``, ``"1.5h"`` or plain seconds (``"300"``) → seconds (> 0);
    ``option`` names the command-line option in the error."""
    m = _DURATION.match(str(text))
    if not m:
        raise BadInputError(
            f"invalid {option} {text!r}: expected a number with s, m or h, e.g. 90s, 20m, 1h"
        )
    seconds = float(m["value"]) * _UNIT_SECONDS[(m["unit"] or "").lower() or None]
    if not (seconds > 0 and math.isfinite(seconds)):
        raise BadInputError(f"invalid {option} {text!r}: it must be more than 0 seconds")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds → ``"1h05m"``, ``"4m10s"``, ``"42s"``."""
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
