"""Every link in the repository's Markdown leads somewhere: the file or folder
it names exists, and so does the heading (or `<a id>`) its `#anchor` names.

A moved doc, a renamed heading or a plot that was never committed shows as a
dead link on the page a reader opened; this finds it in the lint suite
instead. Checked: inline links and images (`[text](target)`,
`![alt](target)`) and reference definitions (`[name]: target`) in every
tracked `*.md` file, outside code blocks and code spans. Links with a scheme
(`https:`, `mailto:`) are not followed: no network here.

Anchors are GitHub's: the heading's text lower-cased, punctuation other than
`-` and `_` dropped, spaces turned into `-`, and `-1`, `-2`... added to
repeats.

    python3 tests/tools/doc_links.py            # exit 1 and one line per dead link
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[2]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); the text may hold one level of brackets
# (an image inside a link). The target ends at whitespace (a title may follow).
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def lines(text: str):
    """(line number, line, inside a fenced code block) of every line."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            yield number, line, True
        elif fence is not None:
            # A closing fence: the same character, at least as long, nothing after it.
            close = line.strip()
            if close.startswith(fence) and not close.strip(fence[0]):
                fence = None
            yield number, line, True
        else:
            yield number, line, False


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks, code spans blanked."""
    for number, line, code in lines(text):
        if not code:
            yield number, CODE_SPAN.sub(lambda s: " " * len(s.group(0)), line)


def slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The `#fragments` a page has: its headings' slugs and its `<a id>`s."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line, code in lines(text):
        if code:
            continue
        found.update(HTML_ANCHOR.findall(line))
        h = HEADING.match(line)
        if h:
            base = slug(h.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(text: str):
    """(line number, target) of every link in the prose."""
    for number, line in prose_lines(text):
        for m in INLINE.finditer(line):
            yield number, m.group(1)
        r = REFERENCE.match(line)
        if r:
            yield number, r.group(1)


def dead_links(md: Path, repo: Path, cache: dict[Path, set[str]] | None = None) -> list[str]:
    """One message per link of `md` that leads nowhere."""
    cache = {} if cache is None else cache
    text = md.read_text(encoding="utf-8")
    problems = []
    for number, target in links(text):
        if not target or SCHEME.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part)
        if path_part.startswith("/"):
            dest = repo / path_part.lstrip("/")
        elif path_part:
            dest = md.parent / path_part
        else:
            dest = md
        where = f"{md.relative_to(repo)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file or folder")
            continue
        if anchor and dest.suffix == ".md":
            key = dest.resolve()
            if key not in cache:
                cache[key] = anchors(dest.read_text(encoding="utf-8"))
            if unquote(anchor) not in cache[key]:
                problems.append(f"{where}: no heading or anchor #{anchor} in {dest.name}")
    return problems


def tracked_markdown(repo: Path) -> list[Path]:
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return sorted({repo / line for line in out.splitlines() if line and (repo / line).exists()})


def main() -> int:
    files = tracked_markdown(REPO)
    cache: dict[Path, set[str]] = {}
    problems = [p for md in files for p in dead_links(md, REPO, cache)]
    for p in problems:
        print(p)
    total = sum(1 for md in files for _ in links(md.read_text(encoding="utf-8")))
    print(f"{len(files)} Markdown files, {total} links, {len(problems)} dead")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
