"""URLs safe to show: in messages, metadata, `spec check` and the sources' `_source_file`."""

from __future__ import annotations

import re


def redact_url(url: str) -> str:
    """The URL with its password (and any password-like query argument) replaced by ***."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        shown = re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)
    return re.sub(
        r"((?:password|passwd|pwd|secret|token)=)[^&]*", r"\1***", shown, flags=re.IGNORECASE
    )
