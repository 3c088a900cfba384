""""Did you mean ...?": the names close to a mistyped one, found the same way wherever a name is looked up (an
architecture, a model in the store, ...).

A person types the start of a long name (``ssdlite`` for ``ssdlite320_mobilenet_v3_large``), a part of it
(``mobilenet``) or a typo (``dmeo``): names that start with what was typed come first, then names that contain it,
then those ``difflib`` finds close. Case, dashes and underscores do not count.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def _plain(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def close_names(typed: str, names: Iterable[str], limit: int = 3) -> list[str]:
    """At most ``limit`` of ``names`` a person who typed ``typed`` may have meant, the likeliest first."""
    names = list(dict.fromkeys(names))
    plain = {_plain(name): name for name in names}
    word = _plain(typed)
    if not word:
        return []
    if word in plain:  # the very name, spelled otherwise
        return [plain[word]]
    found = [name for key, name in plain.items() if key.startswith(word)]
    found += [name for key, name in plain.items() if word in key and name not in found]
    found += [plain[key] for key in difflib.get_close_matches(word, plain, n=limit, cutoff=0.6)
              if plain[key] not in found]
    return found[:limit]


def did_you_mean(typed: str, names: Iterable[str]) -> str:
    """`` (did you mean X?)``, `` (did you mean X, Y or Z?)``, or nothing when no name is close."""
    close = close_names(typed, names)
    if not close:
        return ""
    listed = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
    return f" (did you mean {listed}?)"
