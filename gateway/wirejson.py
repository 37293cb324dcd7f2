"""JSON to bytes for what we send upstream and answer: orjson, with the stdlib for what it refuses.

orjson encodes a chat body about ten times faster than `json.dumps` — the difference shows on the
local path's CPU per request. It refuses integers beyond 64 bits and strings holding lone
surrogates, both of which `json.loads` accepts in a client's body; those go through the stdlib, so
an unusual body costs a little more instead of failing.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(obj: Any, *, sort_keys: bool = False) -> bytes:
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except TypeError:  # orjson.JSONEncodeError: an int > 64 bits, a lone surrogate
        return json.dumps(obj, sort_keys=sort_keys).encode()
