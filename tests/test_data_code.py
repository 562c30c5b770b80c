"""Code corpora to Documents: what is taken, what is skipped and why, and the text kept exact."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from data_prep.code import collect_code
from data_prep.document import Document


def write(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def names(corpus) -> list[str]:
    return [doc.name for doc in corpus.documents]


@pytest.fixture
def no_hang():
    """Fail a test that blocks (opening a FIFO) or loops (a link cycle) instead of hanging."""

    def expired(signum, frame):
        raise TimeoutError("collect_code blocked or looped for 20 s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_git_repo_takes_tracked_and_untracked_files_but_not_ignored_ones(tmp_path):
    repo = write(
        tmp_path / "repo",
        {
            ".gitignore": "generated/\nsecret.py\n",
            "tracked.py": "a = 1\n",
            "untracked.py": "b = 2\n",
            "secret.py": "key = 3\n",
            "generated/out.py": "c = 4\n",
            "pkg/mod.go": "package pkg\n",
        },
    )
    git(repo, "init", "-q")
    git(repo, "add", "tracked.py", "pkg/mod.go")

    assert names(collect_code([repo])) == ["pkg/mod.go", "tracked.py", "untracked.py"]
    # A folder inside the work tree: git's list below it, named from it.
    assert names(collect_code([repo / "pkg"])) == ["mod.go"]


def test_folder_that_git_ignores_is_walked_and_a_skipped_kind_of_root_is_still_taken(tmp_path):
    repo = write(
        tmp_path / "repo",
        {
            ".gitignore": ".venv/\n",
            ".venv/pyvenv.cfg": "home = /usr\n",
            ".venv/lib/site-packages/pkg/__init__.py": "from .core import run\n",
            ".venv/lib/site-packages/pkg/core.py": "def run(): ...\n",
        },
    )
    git(repo, "init", "-q")

    corpus = collect_code([repo / ".venv/lib/site-packages"])

    assert names(corpus) == ["pkg/__init__.py", "pkg/core.py"]


def test_plain_folder_skips_vcs_dependency_cache_build_and_venv_folders(tmp_path):
    root = write(
        tmp_path,
        {
            "src/keep.py": "x = 1\n",
            "vendor/lib/.git/hooks/pre-commit.sh": "exit 0\n",
            "vendor/lib/lib.c": "int f(void);\n",
            ".hg/store.py": "a\n",
            "web/node_modules/left-pad/index.js": "module.exports = 1;\n",
            ".venv/lib/x.py": "b\n",
            "myenv/pyvenv.cfg": "home = /usr\n",
            "myenv/lib/y.py": "c\n",
            "src/__pycache__/keep.py": "d\n",
            "build/lib/keep2.py": "e\n",
            "rust/target/debug/gen.rs": "fn main() {}\n",
        },
    )

    assert names(collect_code([root])) == ["src/keep.py", "vendor/lib/lib.c"]


def test_skipped_files_are_counted_by_reason(tmp_path):
    root = write(
        tmp_path,
        {
            "a_kept.py": "print('hello')\n",
            "b_copy.py": "print('hello')\n",
            "binary.c": b"int x;\0\x01\x02",
            "latin1.py": "caf\xe9 = 1\n".encode("latin-1"),
            "empty.py": b"",
            "at_limit.py": b"#" * 40,
            "over_limit.py": b"#" * 41,
            "notes.txt": "not code\n",
            "logo.png": b"\x89PNG\r\n",
        },
    )
    (root / "dangling.py").symlink_to(root / "gone.py")

    corpus = collect_code([root], max_file_bytes=40)

    assert names(corpus) == ["a_kept.py", "at_limit.py"]
    assert corpus.skipped == Counter(
        {
            "duplicate": 1,
            "binary": 1,
            "not utf-8": 1,
            "empty": 1,
            "too large": 1,
            "type": 2,
            "unreadable": 1,
        }
    )
    assert corpus.files_seen == 10
    assert corpus.skipped.names["type"] == ["logo.png", "notes.txt"]
    assert corpus.skipped.names["duplicate"] == ["b_copy.py"]
    assert corpus.skipped.names["unreadable"] == ["dangling.py"]


def test_include_replaces_the_language_filter_and_exclude_always_applies(tmp_path):
    root = write(
        tmp_path,
        {
            "app.py": "a\n",
            "notes.txt": "b\n",
            "docs/guide.txt": "c\n",
            "gen/a.py": "d\n",
            "gen/deep/b.py": "e\n",
            "pkg/gen/c.py": "f\n",
            "pkg/tests/test_x.py": "g\n",
            "tests/test_y.py": "h\n",
        },
    )

    included = collect_code([root], include=["*.txt"])
    assert names(included) == ["docs/guide.txt", "notes.txt"]
    assert included.skipped == Counter({"type": 6})

    # `gen/*.py` is anchored at the root and `*` stays within a folder; `tests` is at any depth.
    excluded = collect_code([root], exclude=["gen/*.py", "tests"])
    assert names(excluded) == ["app.py", "gen/deep/b.py", "pkg/gen/c.py"]
    assert excluded.skipped == Counter({"excluded": 3, "type": 2})

    spanning = collect_code([root], include=["**/gen/**"], exclude=["deep"])
    assert names(spanning) == ["gen/a.py", "pkg/gen/c.py"]


@pytest.mark.parametrize(
    ("rel", "text", "expected"),
    [
        ("pkg/m.py", "x = 1\n", "# pkg/m.py\nx = 1\n"),
        ("run.sh", "#!/bin/sh\necho hi\n", "#!/bin/sh\n# run.sh\necho hi\n"),
        ("main.go", "package main\n", "// main.go\npackage main\n"),
        ("site.css", "a {}\n", "/* site.css */\na {}\n"),
        ("index.html", "<p>hi</p>\n", "<!-- index.html -->\n<p>hi</p>\n"),
        ("q.sql", "SELECT 1;\n", "-- q.sql\nSELECT 1;\n"),
        ("doc.rst", "Title\n=====\n", ".. doc.rst\nTitle\n=====\n"),
        ("page.php", "<?php echo 1;\n", "<?php // page.php ?>\n<?php echo 1;\n"),
        ("win.c", "int x;\r\nint y;\r\n", "// win.c\r\nint x;\r\nint y;\r\n"),
        ("nb.ipynb", '{"cells": []}\n', '{"cells": []}\n'),
    ],
)
def test_path_header_uses_the_files_own_comment_syntax(tmp_path, rel, text, expected):
    write(tmp_path, {rel: text.encode()})

    corpus = collect_code([tmp_path], path_header=True)

    assert corpus.documents == [Document(name=rel, completion=expected)]


def test_text_is_kept_byte_exact(tmp_path):
    raw = "\ufeffdef f():\r\n    return 'é'   \r\n\r\n\t\n".encode()
    write(tmp_path, {"f.py": raw})

    (doc,) = collect_code([tmp_path]).documents

    assert doc.completion.encode("utf-8") == raw


def test_missing_path_raises_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        collect_code([missing])
    with pytest.raises(FileNotFoundError, match="nomatch"):
        collect_code([tmp_path / "nomatch" / "*.py"])
    with pytest.raises(TypeError):
        collect_code(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_root_raises_naming_it(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        with pytest.raises(PermissionError, match="locked"):
            collect_code([locked])
    finally:
        locked.chmod(0o755)


def test_glob_argument_takes_its_matches_named_from_the_fixed_part(tmp_path):
    write(
        tmp_path,
        {
            "src/a.py": "a\n",
            "src/pkg/b.py": "b\n",
            "src/pkg/data.txt": "c\n",
            "other/c.py": "d\n",
        },
    )

    assert names(collect_code([tmp_path / "src/**/*.py"])) == ["a.py", "pkg/b.py"]
    # A glob picks files itself, so the language filter does not apply to them.
    assert names(collect_code([tmp_path / "src/*/*.txt"])) == ["pkg/data.txt"]


def test_several_roots_are_prefixed_with_their_folder_names(tmp_path):
    write(
        tmp_path,
        {"one/x.py": "1\n", "two/x.py": "2\n", "three/sub/x.py": "3\n", "other/one/y.py": "4\n"},
    )

    corpus = collect_code([tmp_path / "one", tmp_path / "two", tmp_path / "three/sub/x.py"])

    assert names(corpus) == ["one/x.py", "two/x.py", "sub/x.py"]
    with pytest.raises(ValueError, match="share a name"):
        collect_code([tmp_path / "one", tmp_path / "other/one"])


def test_same_files_give_the_same_documents_in_sorted_order_whatever_the_creation_order(tmp_path):
    files = {f"d{i % 3}/f{i}.py": f"v = {i}\n" for i in range(30)}
    forward = write(tmp_path / "forward", files)
    backward = write(tmp_path / "backward", dict(reversed(list(files.items()))))

    first = collect_code([forward])

    assert first.documents == collect_code([backward]).documents
    assert first.documents == collect_code([forward]).documents
    assert names(first) == sorted(files)


def test_special_files_are_skipped_and_counted_never_opened(tmp_path, no_hang):
    root = write(tmp_path / "src", {"a.py": "a = 1\n"})
    os.mkfifo(root / "x.py")  # opened for reading, with no writer, it blocks for ever
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "s.py"))
    try:
        walked = collect_code([root])
        globbed = collect_code([root / "*.py"])
        named = collect_code([root / "x.py"])
    finally:
        server.close()

    for corpus in (walked, globbed):
        assert names(corpus) == ["a.py"]
        assert corpus.skipped.names == {"special file": ["s.py", "x.py"]}
    assert named.documents == [] and named.skipped.names == {"special file": ["x.py"]}
    assert collect_code(["/dev/null"]).skipped == Counter({"special file": 1})


def test_link_cycles_end_and_each_real_folder_is_read_once(tmp_path, no_hang):
    outer = write(tmp_path / "outer", {"tree/a/x.py": "x\n", "tree/b/y.py": "y\n", "z.py": "z\n"})
    tree = outer / "tree"
    (tree / "a" / "up").symlink_to("..")  # the tree itself
    (tree / "b" / "loop").symlink_to("../..")  # the folder holding the tree
    (tree / "b" / "loop2").symlink_to("../..")

    for paths in ([tree], [tree / "**/*.py"]):
        corpus = collect_code(paths)
        assert names(corpus) == ["a/x.py", "b/y.py"]
        assert corpus.skipped.names == {"link outside the tree": ["b/loop/", "b/loop2/"]}
    # Followed, `outer` is read once (through the first link), and the tree in it not again.
    followed = collect_code([tree / "**/*.py"], follow_links=True)
    assert names(followed) == ["a/x.py", "b/loop/z.py", "b/y.py"]
    assert followed.skipped == Counter()


@pytest.mark.parametrize("in_git", [False, True])
def test_links_out_of_the_tree_are_skipped_unless_followed(tmp_path, in_git):
    outside = write(tmp_path / "outside", {"secret.py": "key = 1\n", "lib/util.py": "u = 1\n"})
    tree = write(tmp_path / "tree", {"main.py": "m = 1\n", "pkg/real.py": "r = 1\n"})
    (tree / "stolen.py").symlink_to(outside / "secret.py")
    (tree / "lib").symlink_to(outside / "lib")
    (tree / "alias.py").symlink_to("pkg/real.py")  # inside: taken; the target is then a copy
    (tree / "pkg_link").symlink_to("pkg")  # a folder inside: read once, under its own name
    if in_git:
        git(tree, "init", "-q")

    corpus = collect_code([tree])
    assert names(corpus) == ["alias.py", "main.py"]
    assert corpus.skipped.names == {
        "link outside the tree": ["lib/", "stolen.py"],
        "duplicate": ["pkg/real.py"],
    }
    followed = collect_code([tree], follow_links=True)
    assert names(followed) == ["alias.py", "lib/util.py", "main.py", "stolen.py"]
    # A file named directly is taken wherever its link points.
    assert names(collect_code([tree / "stolen.py"])) == ["stolen.py"]


GITIGNORED_TREE = {
    ".gitignore": "*.log\nout/\n!out/o.py\n/top.py\nsecret*\n!secret_ok.py\ndeep/**/gen_*.py\n",
    "sub/.gitignore": "!keep.log\nlocal.py\n/anchored.py\n",
    "a.py": "1\n",
    "top.py": "2\n",
    "sub/top.py": "3\n",
    "secret.py": "4\n",
    "secret_ok.py": "5\n",
    "sub/secret.py": "6\n",
    "x.log": "7\n",
    "sub/keep.log": "8\n",
    "sub/y.log": "9\n",
    "out/o.py": "10\n",
    "sub/out/o2.py": "11\n",
    "sub/local.py": "12\n",
    "local.py": "13\n",
    "sub/anchored.py": "14\n",
    "sub/deeper/anchored.py": "15\n",
    "deep/p/gen_a.py": "16\n",
    "deep/gen_b.py": "17\n",
    "deep/p/keep.py": "18\n",
}


def test_plain_folder_honours_gitignore_files_at_every_level_as_git_does(tmp_path):
    plain = write(tmp_path / "plain", GITIGNORED_TREE)
    reference = tmp_path / "reference"
    shutil.copytree(plain, reference)
    git(reference, "init", "-q")
    env = os.environ | {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    listed = subprocess.run(
        ["git", "-C", str(reference), "ls-files", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()

    corpus = collect_code([plain], include=["*"])

    assert names(corpus) == sorted(listed)
    assert "secret.py" not in listed and "sub/keep.log" in listed  # the tree tests both ways
    assert corpus.skipped == Counter()


@pytest.mark.parametrize("in_git", [False, True])
def test_globs_leave_out_ignored_files_in_git_trees_and_plain_folders(tmp_path, in_git):
    repo = write(
        tmp_path / "repo",
        {
            ".gitignore": ".env\nsecrets.py\n",
            "app.py": "a\n",
            "secrets.py": "KEY = 1\n",
            ".env": "KEY=1\n",
            "cfg/.env": "KEY=2\n",
            "cfg/secrets.py": "KEY = 2\n",
            "cfg/util.py": "u\n",
        },
    )
    if in_git:
        git(repo, "init", "-q")

    assert names(collect_code([repo / "**/*.py"])) == ["app.py", "cfg/util.py"]
    assert names(collect_code([repo / "**/.*"])) == [".gitignore"]
    assert names(collect_code([repo / "*"])) == ["app.py"]  # a wildcard skips dot files
    with pytest.raises(FileNotFoundError, match="no files match"):
        collect_code([repo / "**/secrets.*"])
