"""Text that reaches a terminal: documents, file and collection names are not trusted.

A document may hold terminal escape sequences (ESC [ ... which can recolour, retitle or rewrite the
screen) and bidirectional overrides (text that reads differently than it is stored); a file name
may hold a newline. `for_terminal` drops them from passages printed by `search` and `ask` (tabs and
newlines stay); `printable` escapes them in one-line messages.
"""

from __future__ import annotations

import re

# C0 controls but \t and \n, DEL, C1 controls, and the bidi embedding/override/isolate marks
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")


def _no_surrogates(text: str) -> str:
    """A file name's undecodable bytes (kept by Python as lone surrogates \\udc80-\\udcff) shown
    as \\xNN, other lone surrogates as \\uNNNN: text that any terminal encoding can print."""
    def show(m: re.Match) -> str:
        c = ord(m.group())
        return f"\\x{c - 0xdc00:02x}" if 0xdc80 <= c <= 0xdcff else f"\\u{c:04x}"

    return _SURROGATE.sub(show, text)


def for_terminal(text: str) -> str:
    """`text` without escape sequences and control characters (\\t and \\n kept)."""
    return _UNSAFE.sub("", _ANSI.sub("", _no_surrogates(text)))


def printable(text: str) -> str:
    """One line: every control character (newlines too) shown escaped, e.g. '\\x1b'."""
    text = _no_surrogates(text)
    return re.sub("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", lambda m: m.group().encode("unicode_escape").decode(), text)


def has_control(text: str) -> bool:
    return bool(re.search("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", text))


def say(msg: str) -> None:
    """One line of progress or notice on stderr, "edge-rag: " first, flushed (also when stderr is no terminal)."""
    import sys

    sys.stderr.write(f"edge-rag: {msg}\n")
    sys.stderr.flush()
