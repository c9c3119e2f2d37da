"""Bounds on what a request may hold, shared by the HTTP endpoint and the CLI's prompt files (no torch import).

``json.loads`` parses recursively: a body nested some 100,000 brackets deep raises ``RecursionError`` (or, in a
thread with a small stack, could overflow it) before any check of ours runs. ``json_depth`` measures the nesting
first, in linear time over the raw bytes, so that a deep body is refused as a bad request and never parsed.
"""

from __future__ import annotations

import re

import numpy as np

MAX_JSON_DEPTH = 16  # a request body is an object of lists and small objects: 3 deep at most today

# A JSON string, or an unterminated one running to the end of the text (a lone trailing backslash included).
# Written as the "unrolled loop" [^"\\]* (\\. [^"\\]*)*: after the loop the next character can only be a quote,
# a final backslash or the end, so every match attempt succeeds without backtracking and the scan is linear even
# for hostile input such as `"\"\"\"...`.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_STEP = np.zeros(256, dtype=np.int8)  # per byte: +1 opens a level, -1 closes one, 0 anything else
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def json_depth(data: bytes | str) -> int:
    """How deep the brackets of a JSON text nest (strings skipped; 0 for a scalar). Exact for valid JSON; for
    invalid JSON some number that ``json.loads`` then refuses anyway."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    steps = _STEP[np.frombuffer(_JSON_STRING.sub(b"", data), dtype=np.uint8)]  # (n,) in {-1, 0, 1}
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def too_deep(data: bytes | str, limit: int = MAX_JSON_DEPTH) -> str | None:
    """A one-line reason when ``data`` nests deeper than ``limit``, else None."""
    depth = json_depth(data)
    if depth > limit:
        return f"the JSON nests {depth} levels deep; at most {limit} are accepted"
    return None
