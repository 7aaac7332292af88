"""`edge-rag` command line: a thin shell over the library.

Each command group lives in its own module and registers on `edge.cli.app.app`.
Errors derived from EdgeRagError become one line on stderr and a non-zero exit code;
EDGE_RAG_DEBUG=1 shows the traceback instead. So do usage mistakes (click's or, from typer
0.29 on, typer's own copy of click, `typer._click`), a full disk, a read-only home and a
closed pipe: never a traceback for something the user can fix.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

from edge.cli.app import app
from edge.errors import EdgeRagError

# Importing registers the commands. Keep each module's top-level imports light.
from edge.cli import profiles_cmd, build_cmd, generate_cmd, rag_cmd, serve_cmd, deploy_cmd, verify_cmd  # noqa: F401,E402
from edge.cli import mqtt_cmd  # noqa: F401,E402  (edge-rag mqtt)

# Where the CLI framework keeps its exception classes: click (typer < 0.29), typer's vendored
# copy of click (typer >= 0.29) and typer's own. Each is looked up; absent ones are skipped.
_FRAMEWORK_MODULES = ("click.exceptions", "typer._click.exceptions", "typer.exceptions")

# OSErrors that a user fixes (space, permissions, names), reported in one line with the path.
_USER_OS_ERRORS = {
    errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded", errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files", errno.ENOTDIR: "not a directory", errno.EISDIR: "is a directory",
}


def framework_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(usage errors with .show() and .exit_code, aborts, exits with .exit_code) of the CLI
    framework in use."""
    usage: list[type] = []
    abort: list[type] = []
    exit_: list[type] = []
    for name in _FRAMEWORK_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for attr, bucket in (("ClickException", usage), ("Abort", abort), ("Exit", exit_)):
            cls = getattr(mod, attr, None)
            if isinstance(cls, type) and cls not in bucket:
                bucket.append(cls)
    return tuple(usage), tuple(abort), tuple(exit_)


def _undecodable_argument(argv: list[str]) -> str | None:
    """An argument holding bytes that are not UTF-8 (Python keeps them as lone surrogates),
    unless it names an existing file (file names may be any bytes)."""
    for a in argv:
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            if not os.path.lexists(os.fsencode(a)):
                return a.encode("utf-8", "backslashreplace").decode("ascii", "replace")
    return None


def _os_error_line(e: OSError) -> str | None:
    why = _USER_OS_ERRORS.get(e.errno or 0)
    if why is None:
        return None
    where = f" {e.filename}" if e.filename else ""
    fix = ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = " (free some space and run the command again; what was there before is intact)"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = " (set EDGE_RAG_HOME to a writable folder, or fix the permissions)"
    return f"cannot write{where}: {why}{fix}" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) \
        else f"{why}:{where or ' ' + str(e)}{fix}"


def _sqlite_error_line(e: Exception) -> str | None:
    msg = str(e)
    if "disk is full" in msg or "disk I/O error" in msg:
        return f"cannot write the document store: {msg} (free some space and run the command again)"
    if "readonly" in msg or "read-only" in msg or "unable to open database" in msg:
        return f"cannot write the document store: {msg} (set EDGE_RAG_HOME to a writable folder)"
    return None


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage, abort, exit_ = framework_exceptions()
    debug = bool(os.environ.get("EDGE_RAG_DEBUG"))
    bad = _undecodable_argument(argv)
    if bad is not None:
        print(f"error: argument {bad!r} is not valid UTF-8 text (fix the terminal's encoding, or type it again)",
              file=sys.stderr)
        return 2
    try:
        rc = app(args=argv, standalone_mode=False)
    except EdgeRagError as e:
        if debug:
            raise
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edge-rag search ... | head`
        _silence_stdout()
        return 141
    except SystemExit as e:
        if isinstance(e.code, str):
            print(f"error: {_one_line(e.code)}", file=sys.stderr)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except usage as e:  # unknown command or option, a value of the wrong type
        if debug:
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None and getattr(ctx, "command_path", "") else ""
        print(f"error: {_one_line(e.format_message())}{hint}", file=sys.stderr)
        return int(getattr(e, "exit_code", 2))
    except abort:
        print("aborted", file=sys.stderr)
        return 1
    except exit_ as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except OSError as e:
        line = _os_error_line(e)
        if line is None or debug:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    except Exception as e:
        line = _sqlite_error_line(e) if type(e).__module__ == "sqlite3" else None
        if line is None or debug:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    return rc if isinstance(rc, int) else 0


def _one_line(msg: str) -> str:
    """Messages are one line: newlines and other control characters (from a file name, a
    collection name) are shown escaped."""
    from edge.textsafe import printable

    return printable(msg)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
