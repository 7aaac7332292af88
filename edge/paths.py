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


def profiles_dir() -> Path:
    """Device profiles shipped with the project (override with $EDGE_RAG_PROFILES)."""
    return Path(os.environ.get("EDGE_RAG_PROFILES", REPO_ROOT / "profiles"))
