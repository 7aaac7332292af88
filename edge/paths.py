"""All state lives under one root: $EDGE_RAG_HOME, default ~/.edge-rag. Tests redirect it."""

from __future__ import annotations

import os
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


def collection_exists(name: str) -> bool:
    """Has collection `name` been ingested (its SQLite store exists)? Creates nothing."""
    return (home() / "collections" / name / "store.sqlite").exists()


def index_dir(name: str = "default") -> Path:
    """Where a document collection's SQLite store and FAISS index live."""
    d = home() / "collections" / name
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
