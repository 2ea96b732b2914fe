"""The parameters a route's path may carry, with their bounds: declared once, for the OpenAPI
document and for the check every request passes before anything looks its values up.

A value outside its bounds answers 404, as a path no route serves: nothing is read, decided or
audited for it, so a token pasted into a URL is never looked up nor written anywhere.
"""

from __future__ import annotations

import re
from typing import Any, Final

from controlplane.schemas import NAME_PATTERN
from controlplane.templates.loader import NAME_PATTERN as TEMPLATE_NAME_PATTERN

_ID: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
PATH_PARAMETERS: Final[dict[str, dict[str, Any]]] = {
    "project": {"type": "string", "pattern": NAME_PATTERN},
    "admin": {"type": "string", "pattern": NAME_PATTERN},
    # Token ids are 32 hex digits; older stores hold 22 or 43 base64url characters.
    "jti": {"type": "string", "pattern": r"^[A-Za-z0-9_-]{1,64}$"},
    "name": {"type": "string", "pattern": TEMPLATE_NAME_PATTERN},
    "version": {"type": "integer", "minimum": 1, "maximum": 10**18 - 1},
    "session": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
    "consumer": {"type": "string", "pattern": _ID},
    "job": {"type": "string", "pattern": _ID},
    "scan": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    # A scan's pictures (controlplane.pictures): any other name is no route's.
    "picture": {"type": "string", "pattern": r"^(bright-field|diffraction)\.png$"},
    # The console's own files: lower-case names, no folders.
    "file": {"type": "string", "pattern": r"^[a-z0-9_-]{1,32}\.[a-z]{1,4}$"},
}


def valid(name: str, value: str) -> bool:
    """Whether ``value`` is within the bounds of path parameter ``name`` (unknown: never)."""
    schema = PATH_PARAMETERS.get(name)
    if schema is None:
        return False
    if schema["type"] == "string":
        return re.fullmatch(schema["pattern"].strip("^$"), value) is not None
    return (re.fullmatch(r"[0-9]{1,19}", value) is not None
            and schema["minimum"] <= int(value) <= schema["maximum"])
