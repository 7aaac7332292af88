"""Loading: files -> `LoadedDoc` (extracted text cut into heading / paragraph blocks with locations).

Every block knows where it came from: a line range in the source file (text, Markdown, reST,
HTML) or a page range (PDF), and char offsets into the document's extracted text. Text files are
decoded as strict UTF-8 (a BOM is dropped); binary, unreadable or undecodable files are skipped
with a warning and counted by the caller, never a crash.

Extension hook: `LOADERS[".ext"] = fn` where `fn(path) -> LoadedDoc | str`; a returned string is
treated as plain text (paragraphs split on blank lines, lines numbered).
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterator

from edge.errors import UsageError


class LoadError(Exception):
    """A file that cannot be loaded; the ingest skips it with this message as the warning."""


@dataclass
class Block:
    """A heading or a paragraph. `loc_*` are 1-based lines (or pages for PDF), inclusive;
    `char_*` are offsets into `LoadedDoc.text` (end exclusive)."""

    text: str
    char_start: int
    char_end: int
    loc_start: int
    loc_end: int
    heading_level: int = 0  # 0 = paragraph; 1..6 = heading depth


@dataclass
class LoadedDoc:
    """One loaded file: its extracted text and its blocks in reading order."""

    path: Path
    text: str
    blocks: list[Block]
    unit: str = "line"  # "line" or "page": what loc_* count
    # For plain-text formats the line of any char offset is exact: offsets of each "\n".
    newlines: list[int] | None = field(default=None, repr=False)

    def loc_of(self, char_start: int, char_end: int, block: Block) -> tuple[int, int]:
        """Line (or page) range of a sub-span of `block`: exact where the text is the source."""
        if self.newlines is None:
            return block.loc_start, block.loc_end
        a = bisect.bisect_left(self.newlines, char_start) + 1
        b = bisect.bisect_left(self.newlines, max(char_start, char_end - 1)) + 1
        return a, b


Loader = Callable[[Path], "LoadedDoc | str"]

# --------------------------------------------------------------------------- text formats

_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
# reST heading levels follow the order in which underline characters first appear.
_BLANK_SPLIT = re.compile(r"\n[ \t]*\n")


def decode_text(data: bytes, path: Path) -> str:
    """Strict UTF-8 (BOM dropped). Binary (NUL bytes) or undecodable data raises LoadError."""
    if b"\x00" in data[:8192]:
        raise LoadError(f"{path}: binary file (NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LoadError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _newlines(text: str) -> list[int]:
    return [m.start() for m in re.finditer("\n", text)]


def text_blocks(path: Path, text: str, *, markdown: bool = False, rst: bool = False) -> LoadedDoc:
    """Cut text into paragraphs on blank lines; Markdown `#` and reST underlined titles become
    heading blocks. Fenced code (```) is kept whole as one paragraph."""
    nl = _newlines(text)
    doc = LoadedDoc(path, text, [], "line", nl)
    rst_levels: list[str] = []

    def line_of(off: int) -> int:
        return bisect.bisect_left(nl, off) + 1

    def add(s: int, e: int, level: int = 0) -> None:
        # trim whitespace, keeping offsets exact
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            doc.blocks.append(Block(text[s:e], s, e, line_of(s), line_of(e - 1), level))

    # Walk line by line, grouping lines into paragraphs; headings are single-line blocks.
    lines = text.split("\n")
    offs = [0]
    for ln in lines[:-1]:
        offs.append(offs[-1] + len(ln) + 1)
    para_start: int | None = None
    in_fence = False
    i = 0
    while i < len(lines):
        ln, off = lines[i], offs[i]
        if markdown and ln.lstrip().startswith("```"):
            in_fence = not in_fence
            if para_start is None:
                para_start = off
            i += 1
            continue
        if in_fence:
            i += 1
            continue
        m = _MD_HEADING.match(ln) if markdown else None
        if m:
            if para_start is not None:
                add(para_start, off)
                para_start = None
            hs = off + ln.index(m.group(2))
            add(hs, hs + len(m.group(2)), len(m.group(1)))
            i += 1
            continue
        if rst and ln.strip() and i + 1 < len(lines) and _RST_UNDERLINE.match(lines[i + 1]) \
                and len(lines[i + 1].rstrip()) >= len(ln.rstrip()):
            ch = lines[i + 1].strip()[0]
            if ch not in rst_levels:
                rst_levels.append(ch)
            if para_start is not None:
                add(para_start, off)
                para_start = None
            add(off, off + len(ln), min(6, rst_levels.index(ch) + 1))
            i += 2
            continue
        if rst and _RST_UNDERLINE.match(ln) and i + 2 < len(lines) and _RST_UNDERLINE.match(lines[i + 2]):
            # overlined title: ===== / Title / =====
            i += 1
            continue
        if not ln.strip():
            if para_start is not None:
                add(para_start, off)
                para_start = None
        elif para_start is None:
            para_start = off
        i += 1
    if para_start is not None:
        add(para_start, len(text))
    return doc


def load_text(path: Path) -> LoadedDoc:
    # plain text manuals often underline their titles (Title / -----): read those as headings
    return text_blocks(path, decode_text(path.read_bytes(), path), rst=True)


def load_markdown(path: Path) -> LoadedDoc:
    # `#` headings and setext (underlined) headings
    return text_blocks(path, decode_text(path.read_bytes(), path), markdown=True, rst=True)


def load_rst(path: Path) -> LoadedDoc:
    return text_blocks(path, decode_text(path.read_bytes(), path), rst=True)


# --------------------------------------------------------------------------- HTML

class _HtmlBlocks(HTMLParser):
    """Collects headings (h1-h6) and paragraph-level text with their source line ranges.
    Script/style/head content is dropped; block-level tags end a paragraph. A table is one
    block of Markdown-style rows, one line per <tr> ("| F4 | 1.5 m/s | 1.5 m |", a "| --- |" line
    under a header row of <th> cells), so that each value stays next to the row and column it
    belongs to (one paragraph per cell loses which value is which)."""

    BLOCK = {"p", "div", "li", "ul", "ol", "table", "tr", "pre", "br", "section",
             "article", "blockquote", "dd", "dt", "dl", "header", "footer", "main", "nav", "hr",
             "figure", "figcaption", "body", "tbody", "thead"}
    SKIP = {"script", "style", "head", "title", "noscript", "template"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[tuple[str, int, int, int]] = []  # (text, level, line_start, line_end)
        self._buf: list[str] = []
        self._start = 0
        self._level = 0
        self._skip = 0
        # the outermost open table: rows of (cells, all cells <th>); nested tables are read as cell text
        self._tables = 0
        self._rows: list[tuple[list[str], bool]] = []
        self._cells: list[str] | None = None  # the open row's cells
        self._cell: list[str] | None = None  # the open cell's text
        self._row_th = True
        self._table_start = 0

    def _flush(self) -> None:
        txt = re.sub(r"[ \t\r\f\v]+", " ", "".join(self._buf))
        txt = "\n".join(s.strip() for s in txt.split("\n") if s.strip())
        if txt:
            self.out.append((txt, self._level, self._start, self.getpos()[0]))
        self._buf = []
        self._level = 0

    # -- tables
    def _end_cell(self) -> None:
        if self._cell is not None:
            if self._cells is None:  # a cell outside any <tr>
                self._cells, self._row_th = [], True
            self._cells.append(" ".join("".join(self._cell).split()).replace("|", "/"))
            self._cell = None

    def _end_row(self) -> None:
        self._end_cell()
        if self._cells:
            self._rows.append((self._cells, self._row_th))
        self._cells = None

    def _end_table(self) -> None:
        self._end_row()
        lines = []
        for i, (cells, th) in enumerate(self._rows):
            lines.append("| " + " | ".join(cells) + " |")
            if i == 0 and th and len(self._rows) > 1:
                lines.append("|" + " --- |" * len(cells))
        if lines:
            self.out.append(("\n".join(lines), 0, self._table_start, self.getpos()[0]))
        self._rows = []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        elif self._tables:
            if tag == "table":
                self._tables += 1
            elif self._tables > 1:
                pass
            elif tag == "tr":
                self._end_row()
                self._cells, self._row_th = [], True
            elif tag in ("td", "th"):
                self._end_cell()
                self._cell = []
                self._row_th = self._row_th and tag == "th"
            if self._cell is not None and (tag in self.BLOCK or tag in ("td", "th")):
                self._cell.append(" ")  # text inside a cell keeps its words apart
        elif tag == "table":
            self._flush()
            self._tables, self._rows, self._cells, self._cell = 1, [], None, None
            self._table_start = self.getpos()[0]
        elif re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self._level = int(tag[1])
            self._start = self.getpos()[0]
        elif tag in self.BLOCK:
            if tag == "br":
                self._buf.append("\n")
            else:
                self._flush()

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        elif self._tables:
            if tag == "table":
                self._tables -= 1
                if not self._tables:
                    self._end_table()
            elif self._tables > 1:
                if self._cell is not None:
                    self._cell.append(" ")
            elif tag in ("td", "th"):
                self._end_cell()
            elif tag == "tr":
                self._end_row()
            elif self._cell is not None:
                self._cell.append(" ")
        elif re.fullmatch(r"h[1-6]", tag) or tag in self.BLOCK:
            self._flush()

    def handle_data(self, data):
        if self._skip:
            return
        if self._tables:
            if self._cell is not None:
                self._cell.append(data)
            elif data.strip():  # text in a table outside any cell (a caption): a cell of its own row
                self._cell = [data]
                self._end_row()
            return
        if not self._buf and data.strip():
            self._start = self.getpos()[0]
        self._buf.append(data)

    def close(self):
        super().close()
        if self._tables:  # an unclosed table
            self._tables = 0
            self._end_table()
        self._flush()


def load_html(path: Path) -> LoadedDoc:
    """HTML via the stdlib parser; lines refer to the source file, headings kept as headings."""
    p = _HtmlBlocks()
    p.feed(decode_text(path.read_bytes(), path))
    p.close()
    parts: list[str] = []
    blocks: list[Block] = []
    off = 0
    for txt, level, a, b in p.out:
        blocks.append(Block(txt, off, off + len(txt), a, max(a, b), level))
        parts.append(txt)
        off += len(txt) + 2
    return LoadedDoc(path, "\n\n".join(parts), blocks, "line", None)


# --------------------------------------------------------------------------- PDF

def load_pdf(path: Path) -> LoadedDoc:
    """PDF via pypdf, one page at a time; blocks keep their page number. Encrypted or corrupt
    files raise LoadError (skipped by the ingest with a warning)."""
    try:
        import pypdf
        from pypdf.errors import PdfReadError
    except ImportError as e:  # pragma: no cover - pypdf is in the build extra
        raise LoadError(f"{path}: reading PDF needs pypdf (pip install pypdf)") from e
    import logging

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # pypdf logs every repaired xref
    try:
        reader = pypdf.PdfReader(str(path), strict=False)
        if reader.is_encrypted:
            try:
                ok = reader.decrypt("")  # an owner-password-only PDF opens with the empty password
            except Exception:
                ok = 0
            if not ok:
                raise LoadError(f"{path}: encrypted PDF (needs a password)")
        pages = [pg.extract_text() or "" for pg in reader.pages]
    except LoadError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError) as e:
        raise LoadError(f"{path}: corrupt PDF ({type(e).__name__}: {e})") from None
    except Exception as e:  # pypdf raises many internal types on malformed input
        raise LoadError(f"{path}: unreadable PDF ({type(e).__name__}: {e})") from None
    text_parts: list[str] = []
    blocks: list[Block] = []
    off = 0
    for pno, ptxt in enumerate(pages, start=1):
        ptxt = ptxt.replace("\r\n", "\n").replace("\r", "\n")
        sub = text_blocks(path, ptxt)
        for bl in sub.blocks:
            blocks.append(Block(bl.text, off + bl.char_start, off + bl.char_end, pno, pno, 0))
        text_parts.append(ptxt)
        off += len(ptxt) + 1  # pages joined by "\f"
    if not any(b.text.strip() for b in blocks):
        raise LoadError(f"{path}: PDF has no extractable text (scanned images?)")
    return LoadedDoc(path, "\f".join(text_parts), blocks, "page", None)


# --------------------------------------------------------------------------- registry

LOADERS: dict[str, Loader] = {
    ".txt": load_text,
    ".text": load_text,
    ".md": load_markdown,
    ".markdown": load_markdown,
    ".rst": load_rst,
    ".html": load_html,
    ".htm": load_html,
    ".pdf": load_pdf,
}


def load(path: Path) -> LoadedDoc:
    """Load one file with the loader registered for its extension. Raises LoadError."""
    fn = LOADERS.get(path.suffix.lower())
    if fn is None:
        raise LoadError(f"{path}: no loader for '{path.suffix}'")
    try:
        res = fn(path)
    except LoadError:
        raise
    except (OSError, PermissionError) as e:
        raise LoadError(f"{path}: unreadable ({e.strerror or e})") from None
    if isinstance(res, str):
        return text_blocks(path, res)
    return res


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


@dataclass
class Scan:
    """What a folder holds for ingestion: loadable files, files refused (path, reason) and the
    number of files of other types."""

    files: list[Path] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)
    unsupported: int = 0


LINK_HINT = "symbolic link (ingest with --follow-links to include links that stay inside the folder)"


def _inside(p: Path, root: Path) -> bool:
    try:
        p.relative_to(root)
        return True
    except ValueError:
        return False


def _refusal(p: Path, real_root: Path, follow_links: bool) -> str | None:
    """Why `p` must not be read, or None. Links never lead outside the ingested folder; devices,
    FIFOs and sockets are never read (a FIFO would block the ingest forever); a regular file with
    other hard links may be another file's alias (e.g. under /etc), refused unless --follow-links."""
    import stat

    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (rename the file)"
    try:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            if not follow_links:
                return LINK_HINT
            target = p.resolve()
            if not _inside(target, real_root):
                return "symbolic link to a file outside the ingested folder (refused, even with --follow-links)"
            st = target.stat()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        return f"unreadable ({getattr(e, 'strerror', None) or e})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (device, FIFO or socket)"
    if st.st_nlink > 1 and not follow_links:
        return "hard link to a file with other names (ingest with --follow-links to include it)"
    return None


def scan(root: Path, *, follow_links: bool = False) -> Scan:
    """The loadable files under `root` (or `root` itself), hidden entries skipped, links and
    special files refused as `_refusal` says. Raises UsageError when the path does not exist."""
    import os

    root = Path(root).expanduser()
    if not root.exists():
        raise UsageError(f"{root}: no such file or folder", fix="give a folder of documents")
    out = Scan()
    real_root = root.resolve()
    if not root.is_dir():
        why = _refusal(real_root, real_root.parent, True)  # the user named it: only special files are refused
        if why and not why.startswith(("symbolic", "hard link")):
            raise UsageError(f"{root}: {why}", fix="give a folder of documents or a document file")
        out.files.append(root)
        return out
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_links):
        d = Path(dirpath)
        try:
            st = d.stat()
            if (st.st_dev, st.st_ino) in seen_dirs:  # a link loop back into the tree
                dirnames[:] = []
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
        except OSError:
            continue
        keep = []
        for name in sorted(dirnames):
            if name.startswith("."):
                continue
            p = d / name
            if p.is_symlink():
                if not follow_links:
                    out.refused.append((p, LINK_HINT))
                    continue
                if not _inside(p.resolve(), real_root):
                    out.refused.append((p, "symbolic link to a folder outside the ingested folder (refused, even with --follow-links)"))
                    continue
            keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = d / name
            if p.suffix.lower() not in LOADERS:
                out.unsupported += 1
                continue
            why = _refusal(p, real_root, follow_links)
            if why:
                out.refused.append((p, why))
            else:
                out.files.append(p)
    out.files.sort()
    return out


def discover(root: Path, *, follow_links: bool = False) -> Iterator[Path]:
    """Files under `root` (or `root` itself) whose extension has a loader; hidden entries, links
    and special files skipped (see `scan`). Raises UsageError when the path does not exist."""
    yield from scan(root, follow_links=follow_links).files
