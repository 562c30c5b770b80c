"""Code corpora to Documents: one source file, one document, its text kept byte for byte.

A corpus is any mix of folders, git work trees, single files and glob patterns. Every file is
either a document or a counted skip (binary, not UTF-8, too large, empty, duplicate, ...), so a
data report can say what was left out and why.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import pathspec

from data_prep.document import Document, Skipped

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
# Skip reasons that are not about a file's content.
SPECIAL = "special file"  # a FIFO, socket or device: opening one can block for ever
LINK_OUT = "link outside the tree"  # a link leaving the folder it was found in


@dataclass
class CodeCorpus:
    """The documents collected, in order, and the files skipped, by reason and by name.

    A folder that could not be listed counts as one "unreadable" skip, named with a slash.
    """

    documents: list[Document] = field(default_factory=list)
    skipped: Skipped = field(default_factory=Skipped)

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
    follow_links: bool = False,
) -> CodeCorpus:
    """One Document per source file under `paths`, in a deterministic order.

    Each path is a folder, a single file, or a glob pattern (`src/**/*.py`). In a git work tree a
    folder holds exactly what `git ls-files` lists, tracked or untracked, so .gitignore holds;
    elsewhere the folder is walked, honouring the .gitignore files in it at every level as git
    would, and leaving out the folders in SKIP_DIRS and virtual environments. A glob picks from
    what its fixed part (`src`) holds by those rules, as a shell glob would (wildcards do not
    match a leading dot). Folder contents are filtered by LANGUAGES, or by `include` when given;
    files named directly or matched by a glob are taken whatever their type. `exclude` always
    applies.

    Links: a link to a folder inside the tree is not walked (its target is, under its own name),
    so every real folder is visited once and link cycles end. A link (to a file or folder) whose
    target is outside the folder or glob base it was found in is skipped as "link outside the
    tree" unless `follow_links`. FIFOs, sockets and devices are skipped as "special file",
    checked before they are opened, so none can block.

    Patterns work as in .gitignore: one matches a path relative to its root or any folder on
    it; `*` stays within a folder and `**` spans folders; a pattern without `/` (`*.py`, `tests`)
    matches at any depth, one with a `/` (`src/**/gen_*.py`) from the root.

    A document's name is its path relative to its root, with the root's folder name in front
    when several paths are given; skipped files are named the same way. `path_header` puts that
    name in a comment line on top (below a `#!` line), in the file's own comment syntax;
    notebooks, being JSON, get none.

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

        def skip(reason: str, rel: str, prefix: str = prefix) -> None:
            corpus.skipped.add(reason, prefix + rel)

        files = _root_files(root, follow_links, skip)
        # Links may not leave the folder a file was found in, except a file named directly.
        tree = None if follow_links or root.named else os.path.realpath(root.base)
        for rel in sorted(files):
            if not root.picked and not wanted(rel):
                skip("type", rel)
                continue
            if excluded(rel):
                skip("excluded", rel)
                continue
            try:
                text = _read_text(os.path.join(root.base, rel), max_file_bytes, kept, tree)
            except _Skip as err:
                skip(err.reason, rel)
                continue
            name = prefix + rel
            if path_header:
                text = _with_header(text, name)
            corpus.documents.append(Document(name=name, completion=text))
    return corpus


@dataclass(frozen=True)
class _Root:
    """Names start at `base`; a file path names one file, a glob path a pattern below `base`."""

    base: Path
    named: str | None = None
    pattern: tuple[str, ...] | None = None

    @property
    def picked(self) -> bool:
        """Whether the path itself picked its files, so the language filter does not apply."""
        return self.named is not None or self.pattern is not None


def _root(path: str | Path) -> _Root:
    path = Path(path)
    if not path.exists():
        pattern = str(path)
        if not _is_glob(pattern):
            raise FileNotFoundError(f"{pattern}: no such file or folder")
        return _glob_root(pattern)
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise PermissionError(f"{path}: cannot read it (permission denied)")
    if path.is_dir():
        return _Root(path)
    return _Root(path.parent, named=path.name)


def _glob_root(pattern: str) -> _Root:
    parts = Path(pattern).parts
    fixed = 0
    while fixed < len(parts) - 1 and not _is_glob(parts[fixed]):
        fixed += 1
    base = Path(*parts[:fixed])
    if not base.is_dir():
        raise FileNotFoundError(f"{pattern}: no files match")
    return _Root(base, pattern=parts[fixed:])


def _root_files(root: _Root, follow_links: bool, skip: Callable[[str, str], None]) -> list[str]:
    """The relative paths a root holds: its named file, or its folder's files (glob-filtered)."""
    if root.named is not None:
        return [root.named]
    files = _list_folder(root.base, follow_links, skip)
    if root.pattern is None:
        return files
    pattern = list(root.pattern)
    files = [rel for rel in files if _glob_match(pattern, rel.split("/"))]
    if not files:
        raise FileNotFoundError(f"{root.base.joinpath(*pattern)}: no files match")
    return files


def _is_glob(path: str) -> bool:
    return any(char in path for char in "*?[")


def _glob_match(pattern: list[str], path: list[str]) -> bool:
    """Whether path components match glob components as glob.glob would (`recursive=True`)."""
    if not pattern:
        return not path
    if pattern[0] == "**":  # zero or more folders, then the rest; never through hidden ones
        return any(
            _glob_match(pattern[1:], path[start:])
            for start in range(len(path) + 1)
            if not any(part.startswith(".") for part in path[:start])
        )
    return (
        bool(path)
        and fnmatchcase(path[0], pattern[0])
        and (pattern[0].startswith(".") or not path[0].startswith("."))
        and _glob_match(pattern[1:], path[1:])
    )


def _prefixes(roots: list[_Root]) -> list[str]:
    """Each root's folder name and a slash; two different folders of one name would collide."""
    folders = [root.base.resolve() for root in roots]
    by_name: dict[str, Path] = {}
    for folder in folders:
        other = by_name.setdefault(folder.name, folder)
        if other != folder:
            raise ValueError(f"{other} and {folder} share a name, so their documents would too")
    return [folder.name + "/" for folder in folders]


def _list_folder(base: Path, follow_links: bool, skip: Callable[[str, str], None]) -> list[str]:
    """Relative POSIX paths of the files in `base`: git's list in a work tree, else a walk."""
    walker = _Walker(base, follow_links, skip)
    listed = _git_files(base)
    if listed is None:
        return walker.walk()
    files = []
    for rel in listed:
        # git lists a link to a folder as one entry and does not look inside it.
        if os.path.islink(os.path.join(base, rel)) and os.path.isdir(os.path.join(base, rel)):
            files += walker.walk_link(rel)
        else:
            files.append(rel)
    return files


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


# The .gitignore files on the way down to a folder: (their folder relative to the base, rules).
_Ignores = tuple[tuple[str, pathspec.GitIgnoreSpec], ...]


class _Walker:
    """Lists the files below `base` as git would without a repository, each real folder once.

    Written by hand because os.walk and glob either never follow links or follow them into
    cycles, and neither reads .gitignore; pathspec applies git's pattern rules.
    """

    def __init__(self, base: Path, follow_links: bool, skip: Callable[[str, str], None]):
        self.base = str(base)
        self.tree = os.path.realpath(base)
        self.follow_links = follow_links
        self.skip = skip
        self.seen = {_folder_id(self.base)}

    def walk(self, start: str = "", ignores: _Ignores = ()) -> list[str]:
        """The files below the folder `start` (relative, ending in `/`; `""` is the base)."""
        files: list[str] = []
        pending = [(start, ignores)]
        while pending:
            rel, ignores = pending.pop()
            folder = os.path.join(self.base, rel)
            try:
                with os.scandir(folder) as scan:
                    entries = sorted(scan, key=lambda entry: entry.name)
            except OSError:
                self.skip("unreadable", rel or "./")
                continue
            if any(entry.name == ".gitignore" and _is_file(entry) for entry in entries):
                ignores = (*ignores, (rel, _read_gitignore(os.path.join(folder, ".gitignore"))))
            below = []
            for entry in entries:
                name = rel + entry.name
                if not _is_dir(entry):
                    if not _ignored(ignores, name):
                        files.append(name)
                elif not (
                    entry.name in SKIP_DIRS
                    or os.path.isfile(os.path.join(entry.path, "pyvenv.cfg"))
                    or _ignored(ignores, name + "/")
                    or (entry.is_symlink() and not self._follow(name))
                    or not self._first_visit(entry.path)
                ):
                    below.append((name + "/", ignores))
            pending += reversed(below)  # depth first, in name order
        return files

    def walk_link(self, rel: str) -> list[str]:
        """The files below a link to a folder that git listed as one entry."""
        if not self._follow(rel) or not self._first_visit(os.path.join(self.base, rel)):
            return []
        return self.walk(rel + "/")

    def _follow(self, rel: str) -> bool:
        """Whether to walk the linked folder `rel`: never inside the tree (it is walked there)."""
        if _inside(os.path.realpath(os.path.join(self.base, rel)), self.tree):
            return False
        if not self.follow_links:
            self.skip(LINK_OUT, rel + "/")
        return self.follow_links

    def _first_visit(self, path: str) -> bool:
        try:
            folder = _folder_id(path)
        except OSError:
            return True  # scandir will count it as unreadable
        if folder in self.seen:
            return False
        self.seen.add(folder)
        return True


def _folder_id(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _read_gitignore(path: str) -> pathspec.GitIgnoreSpec:
    """A .gitignore's rules; unreadable rules are an error, lest ignored secrets be taken."""
    with open(path, encoding="utf-8", errors="surrogateescape") as file:
        lines = file.read().splitlines()
    try:
        return pathspec.GitIgnoreSpec.from_lines(lines)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _ignored(ignores: _Ignores, rel: str) -> bool:
    """Whether git would ignore `rel` (a folder ends in `/`): the deepest matching file decides."""
    for folder, spec in reversed(ignores):
        verdict = spec.check_file(rel[len(folder) :]).include
        if verdict is not None:
            return verdict
    return False


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


def _read_text(path: str, max_bytes: int, kept: set[bytes], tree: str | None) -> str:
    """The file's text; raises _Skip with the reason when it is no new training text.

    `tree`: the folder a link may not lead out of (None: any link is followed).
    """
    try:
        if tree is not None and os.path.islink(path):
            if not _inside(os.path.realpath(path), tree):
                raise _Skip(LINK_OUT)
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise _Skip(SPECIAL)
        # Non-blocking: a FIFO swapped in after the check must not block the open.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        raise _Skip("unreadable") from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Skip(SPECIAL)
        try:
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
