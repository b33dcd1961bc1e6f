"""Names of models and adapters, checked before anything touches storage (SPEC section 1)."""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
VERSION_RE = re.compile(r"^v[1-9][0-9]*$")


class BadName(ValueError):
    """A name that could escape its folder or break a URL; refused up front."""


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise BadName(f"invalid {what} {name!r}: use 1-63 characters of a-z, 0-9, '.', '_', '-', "
                      "starting with a letter or digit (no slashes, spaces or '..')")
    return name


def check_version(version: str) -> str:
    if not VERSION_RE.match(version or ""):
        raise BadName(f"invalid version {version!r}: versions look like v1, v2, ...")
    return version


def split_ref(ref: str, what: str = "adapter") -> tuple[str, str | None]:
    """`NAME` or `NAME@VERSION` -> (name, version or None), both checked."""
    name, sep, version = ref.partition("@")
    check_name(name, what)
    if sep:
        check_version(version)
        return name, version
    return name, None
