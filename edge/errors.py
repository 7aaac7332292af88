"""One error hierarchy. Every user-facing failure is an EdgeRagError whose message says what
went wrong and how to fix it; the CLI prints it as one line and exits non-zero."""

from __future__ import annotations


class EdgeRagError(Exception):
    """Base class for errors a user can act on. `exit_code` is what the CLI returns."""

    exit_code = 1

    def __init__(self, message: str, *, fix: str | None = None):
        self.fix = fix
        super().__init__(message if not fix else f"{message} ({fix})")


class UsageError(EdgeRagError):
    """Bad arguments or values given by the user."""

    exit_code = 2


class ProfileError(EdgeRagError):
    """A device profile is missing, unknown or invalid."""


class ModelError(EdgeRagError):
    """A checkpoint is missing, corrupt, truncated or of an unsupported architecture."""


class BundleError(EdgeRagError):
    """An engine bundle fails its schema or checksums."""


class PlanError(EdgeRagError):
    """The model does not fit the device under the requested limits."""


class BackendError(EdgeRagError):
    """A backend (onnxruntime, cuda, tensorrt) is unavailable or failed."""


class StorageError(EdgeRagError):
    """A write failed for lack of space or permission (full disk, read-only home, quota). What
    was there before stays intact and serviceable; the message says what to free or change."""


class ContextLengthError(UsageError):
    """A prompt does not fit the engine's context."""


class IndexError_(EdgeRagError):
    """The document store or vector index is missing, inconsistent or built with another embedder."""


def missing_collection(name: str, then: str = "") -> IndexError_:
    """The error for a collection that was never ingested (`then`: what to do after ingesting)."""
    extra = "" if name == "default" else f" --collection {name}"
    return IndexError_(f"collection '{name}' does not exist", fix=f"run `edge-rag ingest PATH{extra}`{then or ' first'}")
