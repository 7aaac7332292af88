"""Commands: build_cmd (filled by its owner)."""

from edge.cli.app import app  # noqa: F401
