"""mkdocs hook: links that leave docs/ for a file of the repository (results, figures,
benchmark JSON) are served from a copy under repo/ in the site, so they resolve in the
built site as they do in the repository. A link to a file that does not exist is left as it
is, and mkdocs reports it."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

LINK = re.compile(r"(\]\()(?P<target>\.\./[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")
_wanted: dict[str, Path] = {}


def _repo(config) -> Path:
    return Path(config["docs_dir"]).resolve().parent


def _outside(page_src: str, target: str, config) -> str | None:
    """The repository path a link points to, when it leaves docs/ and the file exists."""
    joined = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_src), target))
    if joined.startswith("docs/") or joined.startswith(".."):
        return None
    return joined if (_repo(config) / joined).is_file() else None


def on_files(files, config):
    repo, docs = _repo(config), Path(config["docs_dir"]).resolve()
    for md in docs.rglob("*.md"):
        src = md.relative_to(docs).as_posix()
        for m in LINK.finditer(md.read_text()):
            path = _outside(src, m.group("target"), config)
            if path:
                _wanted[path] = repo / path
    for path, abs_path in sorted(_wanted.items()):
        files.append(File.generated(config, f"repo/{path}", abs_src_path=str(abs_path)))
    return files


def on_page_markdown(markdown, page, config, files):
    src = page.file.src_uri

    def swap(m):
        path = _outside(src, m.group("target"), config)
        if not path:
            return m.group(0)
        rel = posixpath.relpath(f"repo/{path}", posixpath.dirname(src) or ".")
        return f"{m.group(1)}{rel}{m.group('anchor') or ''})"

    return LINK.sub(swap, markdown)
