"""The workspace's `rust-version` is at least what Cargo.lock needs.

Every crate in the lockfile that Linux builds declares the oldest Rust that
builds it (its own `rust-version`); the workspace cannot build with less than
the newest of those, so `rust-version` in Cargo.toml must not claim less. A
`cargo update` that pulls a crate needing a newer Rust fails here, naming the
crates, until `rust-version` (and the README's prerequisites) say so. Our own
code's use of newer std APIs is clippy's `incompatible_msrv` lint, which reads
the same `rust-version`.

    python3 tests/tools/msrv.py     # prints what the lock needs; exit 1 if rust-version is lower
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLATFORM = "x86_64-unknown-linux-gnu"


def version(text: str | None) -> tuple[int, int, int]:
    """"1.88" and "1.88.0" alike as (1, 88, 0); unset as (0, 0, 0)."""
    parts = [int(part) for part in text.split(".")] if text else []
    major, minor, patch = (parts + [0, 0, 0])[:3]
    return major, minor, patch


def show(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


def needed(metadata: dict) -> tuple[tuple[int, int, int], list[str]]:
    """The newest rust-version among the resolved registry crates, and the crates that declare it."""
    resolved = {node["id"] for node in metadata["resolve"]["nodes"]}
    crates = [p for p in metadata["packages"] if p["id"] in resolved and p["source"]]
    top = max((version(p["rust_version"]) for p in crates), default=(0, 0, 0))
    return top, sorted(f"{p['name']} {p['version']}" for p in crates if version(p["rust_version"]) == top)


def declared(metadata: dict) -> dict[str, tuple[int, int, int]]:
    members = set(metadata["workspace_members"])
    return {p["name"]: version(p["rust_version"]) for p in metadata["packages"] if p["id"] in members}


def main() -> int:
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", PLATFORM],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    metadata = json.loads(out)
    need, crates = needed(metadata)
    print(f"Cargo.lock needs Rust {show(need)} ({', '.join(crates)})")
    low = {name: v for name, v in declared(metadata).items() if v < need}
    for name, v in sorted(low.items()):
        print(f"{name}: rust-version {show(v) if v != (0, 0, 0) else 'unset'} is below {show(need)}: raise it in Cargo.toml")
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
