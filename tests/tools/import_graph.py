#!/usr/bin/env python3
"""Import-graph check of a crate's top-level modules.

Reads every `crate::<module>` reference (in `use` lines and in paths, grouped
`use crate::{a::X, b::Y}` too; comments skipped) under a crate's `src/`,
builds the graph of top-level modules, and checks it against the crate's
declared layer order in a ratchet file (tests/tools/import_graph.toml):

- an *upward* edge is an import of a module in a higher layer;
- a *cycle* edge is an import between two modules of the same strongly
  connected component (an import circle).

The ratchet file lists the upward and cycle edges that exist today. The check
fails when a new one appears, and when a listed one is gone but still listed,
so the list only shrinks. It prints each crate's strongly connected
components.

    python3 tests/tools/import_graph.py            # check every crate in the file
    python3 tests/tools/import_graph.py --graph    # also print every edge

Exits 0 when every crate passes, 1 otherwise. Unit tests:
`python3 -m unittest discover -s tests/tools`.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_CRATE_PATH = re.compile(r"\bcrate\s*::\s*(" + IDENT + r"|\{)")
_ROOT_REEXPORT = re.compile(r"^\s*pub\s+use\s+(?:self::|crate::)?(" + IDENT + r")\s*::\s*(" + IDENT + r")")


def strip_comments(src: str) -> str:
    """Blanks out comments and string literals, keeping line structure."""
    out: list[str] = []
    i, n = 0, len(src)
    depth = 0  # block comment nesting
    while i < n:
        c = src[i]
        two = src[i : i + 2]
        if depth:
            if two == "/*":
                depth += 1
                i += 2
            elif two == "*/":
                depth -= 1
                i += 2
            else:
                out.append("\n" if c == "\n" else " ")
                i += 1
        elif two == "//":
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif two == "/*":
            depth = 1
            i += 2
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j + 1
        elif c == "r" and re.match(r'r#*"', src[i:i + 8]) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', src[i:]).group(1)
            end = src.find('"' + hashes, i + len(hashes) + 2)
            end = n if end < 0 else end + 1 + len(hashes)
            out.append('""' + "\n" * src.count("\n", i, end))
            i = end
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", src[i:i + 4]):
            m = re.match(r"'(\\.|[^\\'])'", src[i:])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _group_heads(text: str, start: int) -> list[str]:
    """First identifiers of the items of the `{...}` group opening at `start`."""
    depth, item, heads = 0, [], []
    for ch in text[start:]:
        if ch == "{":
            depth += 1
            if depth == 1:
                continue
        elif ch == "}":
            depth -= 1
            if depth == 0:
                heads.append("".join(item))
                break
        if depth == 1 and ch == ",":
            heads.append("".join(item))
            item = []
        elif depth >= 1:
            item.append(ch)
    names = []
    for h in heads:
        m = re.match(r"\s*(" + IDENT + r")", h)
        if m:
            names.append(m.group(1))
    return names


def referenced_names(src: str) -> set[str]:
    """Names right after `crate::` in one file's code."""
    code = strip_comments(src)
    names: set[str] = set()
    for m in _CRATE_PATH.finditer(code):
        if m.group(1) == "{":
            names.update(_group_heads(code, m.start(1)))
        else:
            names.add(m.group(1))
    return names


def module_of(src_dir: Path, path: Path) -> str | None:
    """Top-level module a file belongs to; None for the crate roots."""
    rel = path.relative_to(src_dir)
    if len(rel.parts) == 1:
        stem = rel.stem
        return None if stem in ("lib", "main") else stem
    if rel.parts[0] == "bin":
        return None
    return rel.parts[0]


@dataclass
class Graph:
    modules: set[str] = field(default_factory=set)
    edges: set[tuple[str, str]] = field(default_factory=set)


def crate_graph(src_dir: Path) -> Graph:
    """Top-level modules of a crate and the `crate::` edges between them."""
    files = sorted(src_dir.rglob("*.rs"))
    g = Graph()
    for f in files:
        m = module_of(src_dir, f)
        if m:
            g.modules.add(m)
    # Names the crate root re-exports (`pub use config::Config;` makes
    # `crate::Config` a reference to `config`).
    alias: dict[str, str] = {}
    lib = src_dir / "lib.rs"
    if lib.exists():
        for line in strip_comments(lib.read_text()).splitlines():
            r = _ROOT_REEXPORT.match(line)
            if r and r.group(1) in g.modules:
                alias[r.group(2)] = r.group(1)
    for f in files:
        src_mod = module_of(src_dir, f)
        if src_mod is None:
            continue
        for name in referenced_names(f.read_text()):
            dst = name if name in g.modules else alias.get(name)
            if dst and dst != src_mod:
                g.edges.add((src_mod, dst))
    return g


def sccs(modules: set[str], edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan), each sorted; biggest first."""
    succ: dict[str, list[str]] = {m: [] for m in modules}
    for a, b in sorted(edges):
        succ.setdefault(a, []).append(b)
        succ.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return sorted(out, key=lambda c: (-len(c), c))


@dataclass
class Report:
    crate: str
    components: list[list[str]]
    unlayered: list[str]
    new_upward: list[tuple[str, str]]
    new_cycle: list[tuple[str, str]]
    gone_upward: list[tuple[str, str]]
    gone_cycle: list[tuple[str, str]]

    @property
    def ok(self) -> bool:
        return not (self.unlayered or self.new_upward or self.new_cycle or self.gone_upward or self.gone_cycle)


def _edges(items: list[str], crate: str, key: str) -> set[tuple[str, str]]:
    out = set()
    for item in items:
        parts = [p.strip() for p in item.split("->")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{crate}.{key}: {item!r} is not 'a -> b'")
        out.add((parts[0], parts[1]))
    return out


def check(crate: str, graph: Graph, spec: dict) -> Report:
    """Compares one crate's graph with its layers and known edges."""
    layer: dict[str, int] = {}
    for i, row in enumerate(spec["layers"]):
        for m in row.split():
            layer[m] = i
    comps = [c for c in sccs(graph.modules, graph.edges) if len(c) > 1]
    comp_of = {m: i for i, c in enumerate(comps) for m in c}
    cycle = {(a, b) for a, b in graph.edges if a in comp_of and comp_of.get(a) == comp_of.get(b)}
    upward = {(a, b) for a, b in graph.edges if a in layer and b in layer and layer[b] > layer[a]}
    known_up = _edges(spec.get("known_upward", []), crate, "known_upward")
    known_cycle = _edges(spec.get("known_cycle", []), crate, "known_cycle")
    return Report(
        crate=crate,
        components=comps,
        unlayered=sorted(graph.modules - layer.keys()),
        new_upward=sorted(upward - known_up),
        new_cycle=sorted(cycle - known_cycle),
        gone_upward=sorted(known_up - upward),
        gone_cycle=sorted(known_cycle - cycle),
    )


def render(r: Report) -> list[str]:
    lines = [f"{r.crate}: {len(r.components)} import circle(s)"]
    for c in r.components:
        lines.append(f"  circle of {len(c)}: {' '.join(c)}")
    if r.unlayered:
        lines.append(f"  modules in no layer (add them to the layers): {' '.join(r.unlayered)}")
    for title, edges in (
        ("new upward import", r.new_upward),
        ("new import in a circle", r.new_cycle),
        ("listed upward import no longer exists (remove it from known_upward)", r.gone_upward),
        ("listed circle import no longer in a circle (remove it from known_cycle)", r.gone_cycle),
    ):
        for a, b in edges:
            lines.append(f"  {title}: {a} -> {b}")
    lines.append(f"  {r.crate}: {'ok' if r.ok else 'FAILED'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratchet", type=Path, default=here / "import_graph.toml")
    ap.add_argument("--root", type=Path, default=here.parent.parent, help="repository root")
    ap.add_argument("--graph", action="store_true", help="print every edge")
    args = ap.parse_args(argv)
    spec = tomllib.loads(args.ratchet.read_text())
    passed = failed = 0
    for crate, cspec in spec.items():
        graph = crate_graph(args.root / cspec["src"])
        if args.graph:
            for a, b in sorted(graph.edges):
                print(f"{crate}: {a} -> {b}")
        r = check(crate, graph, cspec)
        print("\n".join(render(r)))
        if r.ok:
            passed += 1
        else:
            failed += 1
    print(f"import graph: {passed} crate(s) ok, {failed} failing")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
