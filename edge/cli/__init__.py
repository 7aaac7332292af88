"""`edge-rag` command line: a thin shell over the library.

Each command group lives in its own module and registers on `edge.cli.app.app`.
Errors derived from EdgeRagError become one line on stderr and a non-zero exit code;
EDGE_RAG_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

from edge.cli.app import app
from edge.errors import EdgeRagError

# Importing registers the commands. Keep each module's top-level imports light.
from edge.cli import profiles_cmd, build_cmd, generate_cmd, rag_cmd, serve_cmd, deploy_cmd  # noqa: F401,E402
from edge.cli import mqtt_cmd  # noqa: F401,E402  (edge-rag mqtt)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    try:
        app(args=argv, standalone_mode=False)
    except EdgeRagError as e:
        if os.environ.get("EDGE_RAG_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # typer/click exits (--help, usage errors)
        return int(e.code or 0)
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            return 1
        raise
    return 0
