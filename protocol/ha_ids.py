"""Home Assistant object ids for vlmd's entities: injective, readable where they can be,
the same on every start (issue 21: names that mapped to one id overwrote each other's
entity). Topics built from them live in protocol.topics (`ha_config_topic`)."""

from __future__ import annotations

import hashlib
import json
import re

_HA_PLAIN_RE = re.compile(r"[A-Za-z0-9-]+")
HA_ID_DIGEST_CHARS = 10  # hex: 40 bits of sha256, for ids whose parts are not all plain


def ha_object_id(*parts: str) -> str:
    """A Home Assistant node or object id ([A-Za-z0-9_-] only) naming exactly one tuple of
    `parts` (a kind word, then names: ("watch", watch, property)), the same on every start.

    Parts of only [A-Za-z0-9-] are joined by '_' as they are ("caption_porch"): '_' is then
    only a separator, so two such tuples never meet. Any other tuple (a name holding '_' or
    '.', or a property key of any text) is written readably with those characters as '_'
    and ends with "__" and a digest of the exact parts: "caption_front_door__<10 hex>", which
    no plain tuple can spell (it never holds "__"). So cameras front.door and front_door,
    watches a.b and a_b, watch p property q_r and watch p_q property r all differ (issue 21).
    """
    if parts and all(_HA_PLAIN_RE.fullmatch(part) for part in parts):
        return "_".join(parts)
    readable = "_".join(re.sub(r"[^A-Za-z0-9-]", "_", part) for part in parts)
    digest = hashlib.sha256(json.dumps(parts).encode("utf-8", "surrogatepass")).hexdigest()[:HA_ID_DIGEST_CHARS]
    return f"{readable}__{digest}"


def ha_legacy_object_id(*parts: str) -> str:
    """The id vlmd gave `parts` before ha_object_id was injective (every character outside
    [A-Za-z0-9_-] as '_'): discovery empties that topic once it differs, so an upgrade
    leaves no stale entity behind."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", "_".join(parts)) or "_"
