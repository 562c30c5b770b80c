"""Code corpora to Documents: one source file, one document, its text kept byte for byte.

A corpus is any mix of folders, git work trees, single files and glob patterns. Every file is
either a document or a counted skip (binary, not UTF-8, too large, empty, duplicate, ...), so a
data report can say what was left out and why.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import subprocess
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from data_prep.document import Document

# The 20 languages of the replit-code-v1-3b model card, by file extension (matched lowercased).
LANGUAGES: dict[str, str] = {
    ".md": "Markdown",
    ".markdown": "Markdown",
    ".java": "Java",
    ".js": "JavaScript",
    ".mjs": "JavaScript",
    ".cjs": "JavaScript",
    ".py": "Python",
    ".pyi": "Python",
    ".ts": "TypeScript",
    ".mts": "TypeScript",
    ".cts": "TypeScript",
    ".tsx": "TypeScript",
    ".php": "PHP",
    ".sql": "SQL",
    ".jsx": "JSX",
    ".rst": "reStructuredText",
    ".rs": "Rust",
    ".c": "C",
    ".h": "C",
    ".css": "CSS",
    ".go": "Go",
    ".cpp": "C++",
    ".cc": "C++",
    ".cxx": "C++",
    ".hpp": "C++",
    ".hh": "C++",
    ".hxx": "C++",
    ".html": "HTML",
    ".htm": "HTML",
    ".vue": "Vue",
    ".rb": "Ruby",
    ".ipynb": "Jupyter Notebook",
    ".r": "R",
    ".sh": "Shell",
    ".bash": "Shell",
}

# A one-line comment in each language, for the path header. Notebooks are JSON: no comments.
# PHP text outside `<?php` is output, so the header is a PHP block of its own.
_COMMENT: dict[str, str] = {
    **dict.fromkeys(["Python", "Shell", "Ruby", "R"], "# {}"),
    **dict.fromkeys(["Java", "JavaScript", "TypeScript", "JSX", "Rust", "C", "C++", "Go"], "// {}"),
    **dict.fromkeys(["Markdown", "HTML", "Vue"], "<!-- {} -->"),
    "CSS": "/* {} */",
    "PHP": "<?php // {} ?>",
    "SQL": "-- {}",
    "reStructuredText": ".. {}",
}

# Folders below a root that hold version control, dependencies, caches or build output, not
# sources. A root itself is always taken, so a site-packages folder can be a corpus.
SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "node_modules",
        "site-packages",
        ".venv",
        "venv",
        "__pycache__",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".tox",
        ".nox",
        "build",
        "dist",
        "target",
    }
)

_BINARY_PROBE = 8192


@dataclass
class CodeCorpus:
    """The documents collected, in order, and how many files were skipped for each reason.

    A folder that could not be listed counts as one "unreadable" skip.
    """

    documents: list[Document] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def files_seen(self) -> int:
        return len(self.documents) + sum(self.skipped.values())


def collect_code(
    paths: Sequence[str | Path],
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    max_file_bytes: int = 1_000_000,
    path_header: bool = False,
) -> CodeCorpus:
    """One Document per source file under `paths`, in a deterministic order.

    Each path is a folder, a single file, or a glob pattern (`src/**/*.py`). In a git work tree a
    folder holds exactly what `git ls-files` lists, tracked or untracked, so .gitignore holds;
    elsewhere the folder is walked, leaving out the folders in SKIP_DIRS and virtual
    environments. Folder contents are filtered by LANGUAGES, or by `include` when given; files
    named directly or matched by a glob are taken whatever their type or folder. `exclude`
    always applies.

    Patterns work as in .gitignore: one matches a path relative to its root or any folder on
    it; `*` stays within a folder and `**` spans folders; a pattern without `/` (`*.py`, `tests`)
    matches at any depth, one with a `/` (`src/**/gen_*.py`) from the root.

    A document's name is its path relative to its root, with the root's folder name in front
    when several paths are given. `path_header` puts that name in a comment line on top (below
    a `#!` line), in the file's own comment syntax; notebooks, being JSON, get none.

    Raises FileNotFoundError or PermissionError, naming the path, for a root that is missing or
    unreadable; an unreadable file or folder inside one is skipped as "unreadable".
    """
    if isinstance(paths, str):
        raise TypeError("paths is a list of paths, not one string")
    roots = [_root(path) for path in paths]
    prefixes = _prefixes(roots) if len(roots) > 1 else [""]
    wanted = _matcher(include) if include else _known_language
    excluded = _matcher(exclude)
    corpus = CodeCorpus()
    kept: set[bytes] = set()
    for root, prefix in zip(roots, prefixes, strict=True):
        files = root.chosen or _list_folder(root.base, corpus.skipped)
        for rel in sorted(files):
            if not root.chosen and not wanted(rel):
                corpus.skipped["type"] += 1
                continue
            if excluded(rel):
                corpus.skipped["excluded"] += 1
                continue
            try:
                text = _read_text(os.path.join(root.base, rel), max_file_bytes, kept)
            except _Skip as skip:
                corpus.skipped[skip.reason] += 1
                continue
            name = prefix + rel
            if path_header:
                text = _with_header(text, name)
            corpus.documents.append(Document(name=name, completion=text))
    return corpus


@dataclass(frozen=True)
class _Root:
    """Names start at `base`; `chosen` are the files a file or glob path picked, else empty."""

    base: Path
    chosen: tuple[str, ...] = ()


def _root(path: str | Path) -> _Root:
    path = Path(path)
    if not path.exists():
        pattern = str(path)
        if not _is_glob(pattern):
            raise FileNotFoundError(errno.ENOENT, "no such file or folder", pattern)
        return _glob_root(pattern)
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise PermissionError(errno.EACCES, "cannot read", str(path))
    if path.is_dir():
        return _Root(path)
    return _Root(path.parent, (path.name,))


def _glob_root(pattern: str) -> _Root:
    parts = Path(pattern).parts
    fixed = 0
    while fixed < len(parts) - 1 and not _is_glob(parts[fixed]):
        fixed += 1
    base = Path(*parts[:fixed])
    matches = [Path(match) for match in glob.glob(pattern, recursive=True)]
    files = tuple(match.relative_to(base).as_posix() for match in matches if match.is_file())
    if not files:
        raise FileNotFoundError(errno.ENOENT, "no files match", pattern)
    return _Root(base, files)


def _is_glob(path: str) -> bool:
    return any(char in path for char in "*?[")


def _prefixes(roots: list[_Root]) -> list[str]:
    """Each root's folder name and a slash; two different folders of one name would collide."""
    folders = [root.base.resolve() for root in roots]
    by_name: dict[str, Path] = {}
    for folder in folders:
        other = by_name.setdefault(folder.name, folder)
        if other != folder:
            raise ValueError(f"{other} and {folder} share a name, so their documents would too")
    return [folder.name + "/" for folder in folders]


def _list_folder(base: Path, skipped: Counter[str]) -> list[str]:
    """Relative POSIX paths of the files in `base`: git's list in a work tree, else a walk."""
    listed = _git_files(base)
    return listed if listed is not None else _walk(base, skipped)


def _git_files(base: Path) -> list[str] | None:
    """`git ls-files` under `base`, or None when no work tree holds it or git ignores it."""
    absolute = base.resolve()
    if not any((folder / ".git").exists() for folder in (absolute, *absolute.parents)):
        return None
    if _git(base, "check-ignore", "-q", ".").returncode == 0:
        return None
    listed = _git(base, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if listed.returncode != 0:
        message = listed.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"git ls-files failed in {base}: {message}")
    return [os.fsdecode(name) for name in listed.stdout.split(b"\0") if name]


def _git(base: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(["git", "-C", str(base), *args], capture_output=True, check=False)
    except FileNotFoundError as error:
        raise RuntimeError(f"{base} is in a git work tree, and git is not installed") from error


def _walk(base: Path, skipped: Counter[str]) -> list[str]:
    def unreadable(error: OSError) -> None:
        skipped["unreadable"] += 1

    files = []
    for folder, subfolders, names in os.walk(base, onerror=unreadable):
        subfolders[:] = [sub for sub in subfolders if not _skip_folder(folder, sub)]
        rel = Path(folder).relative_to(base).as_posix()
        start = "" if rel == "." else rel + "/"
        files += [start + name for name in names]
    return files


def _skip_folder(parent: str, name: str) -> bool:
    return name in SKIP_DIRS or os.path.isfile(os.path.join(parent, name, "pyvenv.cfg"))


def _known_language(rel: str) -> bool:
    return os.path.splitext(rel)[1].lower() in LANGUAGES


def _matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    """Whether a relative path matches any pattern (see collect_code for the rules)."""
    split = []
    for pattern in patterns:
        body = pattern.rstrip("/")
        parts = body.lstrip("/").split("/")
        split.append(parts if "/" in body else ["**", *parts])
    return lambda rel: any(_match(parts, rel.split("/")) for parts in split)


def _match(pattern: list[str], path: list[str]) -> bool:
    if not pattern:
        return True  # the pattern named the file or a folder above it
    if pattern[0] == "**":
        return any(_match(pattern[1:], path[start:]) for start in range(len(path) + 1))
    return bool(path) and fnmatchcase(path[0], pattern[0]) and _match(pattern[1:], path[1:])


class _Skip(Exception):
    """Why a file is left out of the corpus."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _read_text(path: str, max_bytes: int, kept: set[bytes]) -> str:
    """The file's text; raises _Skip with the reason when it is no new training text."""
    try:
        with open(path, "rb") as file:
            data = file.read(max_bytes + 1)
    except OSError:
        raise _Skip("unreadable") from None
    if len(data) > max_bytes:
        raise _Skip("too large")
    if not data:
        raise _Skip("empty")
    if b"\0" in data[:_BINARY_PROBE]:
        raise _Skip("binary")
    digest = hashlib.sha256(data).digest()
    if digest in kept:
        raise _Skip("duplicate")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Skip("not utf-8") from None
    kept.add(digest)
    return text


def _with_header(text: str, name: str) -> str:
    """`text` with `name` in a comment line on top, below a `#!` line (which must stay first)."""
    comment = _COMMENT.get(LANGUAGES.get(os.path.splitext(name)[1].lower(), ""))
    if comment is None:
        return text
    first, newline, rest = text.partition("\n")
    eol = "\r\n" if first.endswith("\r") else "\n"
    header = comment.format(name) + eol
    if first.startswith("#!"):
        return first + (newline or eol) + header + rest
    return header + text
