"""All state lives under one root: $EDGE_RAG_HOME, default ~/.edge-rag. Tests redirect it."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def home() -> Path:
    """The state root (created on first use)."""
    root = Path(os.environ.get("EDGE_RAG_HOME", Path.home() / ".edge-rag")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def engines_dir() -> Path:
    """Where default engines are built and cached."""
    d = home() / "engines"
    d.mkdir(parents=True, exist_ok=True)
    return d


COLLECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_collection_name(name: str) -> str:
    """A collection name is a folder name: 1-64 letters, digits, '-', '_' or '.', not starting
    with '.' or '-' (no '/', no '..', no control characters). Raises UsageError."""
    from edge.errors import UsageError

    if not isinstance(name, str) or not COLLECTION_NAME.fullmatch(name):
        from edge.textsafe import printable

        shown = printable(name if len(name) <= 40 else name[:40] + "...") if isinstance(name, str) else repr(name)
        raise UsageError(f"bad collection name '{shown}'" + (f" ({len(name)} characters)" if isinstance(name, str) and len(name) > 64 else ""),
                         fix="use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit")
    return name


def collection_exists(name: str) -> bool:
    """Has collection `name` been ingested (its SQLite store exists)? Creates nothing.
    Raises UsageError for a name that cannot be a collection."""
    return (home() / "collections" / check_collection_name(name) / "store.sqlite").exists()


def index_dir(name: str = "default") -> Path:
    """Where a document collection's SQLite store and FAISS index live."""
    d = home() / "collections" / check_collection_name(name)
    d.mkdir(parents=True, exist_ok=True)
    return d


# The top-level profiles/ folder is the source; edge/profiles_data is a symlink to it, so that a
# wheel carries the profiles as package data (setuptools copies the files through the link) and a
# source checkout reads them through the same path.
PACKAGED_PROFILES = Path(__file__).resolve().parent / "profiles_data"


def profiles_dir() -> Path:
    """Device profiles: $EDGE_RAG_PROFILES, else the package's profiles_data (a wheel install or a
    checkout), else the checkout's profiles/ (a copy that lost the symlink)."""
    forced = os.environ.get("EDGE_RAG_PROFILES")
    if forced:
        return Path(forced)
    if PACKAGED_PROFILES.is_dir():
        return PACKAGED_PROFILES
    return REPO_ROOT / "profiles"
