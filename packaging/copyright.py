"""Writes the package's copyright file (Debian's machine-readable format,
DEP-5) from cargo-about's JSON: one `Files: *` paragraph for EdgeGate itself,
then one paragraph per crate linked into /usr/bin/edgegate (name and version
from Cargo.lock, its copyright notices, the license we take it under), then
the license texts.

Apache-2.0 is referred to /usr/share/common-licenses. Every other license
text is the crate's own (it carries the crate's copyright notice, which MIT,
ISC and BSD require to be reproduced), once per distinct text: the first is
named by its SPDX id, variants get `~crate` (`MIT~tokio`).

Run by packaging/copyright.sh, which runs cargo-about; not on its own:

    cargo about generate --format json ... | python3 packaging/copyright.py > packaging/copyright
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict

HEADER = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edgegate
Upstream-Contact: EdgeGate engineers <eng@edgegate.dev>
Source: https://example.invalid/edgegate
Comment: /usr/bin/edgegate links its Rust dependencies, crates from
 crates.io, statically: each has a paragraph below ("Files:
 crates.io/NAME-VERSION/*" stands for that crate's source). Generated from
 Cargo.lock by cargo-about ({tool}) with packaging/about.toml and
 packaging/copyright.py; regenerate with packaging/copyright.sh, which the
 appliance suite runs with --check.

Files: *
Copyright: 2026 EdgeGate engineers <eng@edgegate.dev>
License: Apache-2.0
"""

APACHE = """\
License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the "License");
 you may not use this file except in compliance with the License.
 You may obtain a copy of the License at
 .
 https://www.apache.org/licenses/LICENSE-2.0
 .
 Unless required by applicable law or agreed to in writing, software
 distributed under the License is distributed on an "AS IS" BASIS,
 WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
 See the License for the specific language governing permissions and
 limitations under the License.
 .
 On Debian systems, the complete text of the Apache License, Version 2.0
 can be found in "/usr/share/common-licenses/Apache-2.0".
"""

# A copyright notice line in a license text: "Copyright (c) 2019 Carl Lerche",
# "Copyright 2015-2016 Brian Smith.", "(c) 2020 ..." -- not the licenses'
# own sentences ("the above copyright notice", Apache's "(c) You must
# retain") nor their templates ("Copyright {yyyy} {name of copyright owner}").
NOTICE = re.compile(
    r"^(?:copyright\b(?!\s*(?:notice|holders?|owners?|license|and|statement|law)\b)(?![,.:;])|(?:\(c\)|©)\s*\d)",
    re.IGNORECASE,
)
PLACEHOLDER = re.compile(r"[\[{<](?:yyyy|year|name of copyright owner|fullname|copyright holders?)[\]}>]", re.IGNORECASE)


def field_text(text: str) -> str:
    """A license text as the continuation lines of a field: each line indented
    by one space, empty lines as " ."."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\t", "    ").split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(f" {line}" if line.strip() else " ." for line in lines)


def notices(text: str) -> list[str]:
    found = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if NOTICE.match(line) and not PLACEHOLDER.search(line) and line not in found:
            found.append(line)
    return found


def render(about: dict, tool: str) -> str:
    """The copyright file for cargo-about's `--format json` output."""
    # Each license that cargo-about used, with the crates it satisfies.
    texts: dict[str, str] = {}  # short name -> text
    names_by_key: dict[tuple[str, str], str] = {}  # (SPDX id, text) -> short name
    per_crate: dict[tuple[str, str], list[str]] = defaultdict(list)  # crate -> short names
    crate_texts: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    packages: dict[tuple[str, str], dict] = {}
    for lic in sorted(about["licenses"], key=lambda lic: (lic["id"], min(u["crate"]["name"] for u in lic["used_by"]))):
        users = sorted(lic["used_by"], key=lambda u: (u["crate"]["name"], u["crate"]["version"]))
        key = (lic["id"], lic["text"])
        if lic["id"] == "Apache-2.0":
            name = "Apache-2.0"
        elif key in names_by_key:
            name = names_by_key[key]
        else:
            name = lic["id"] if lic["id"] not in texts else f"{lic['id']}~{users[0]['crate']['name']}"
            texts[name] = lic["text"]
            names_by_key[key] = name
        for user in users:
            if not user["crate"]["source"]:
                continue  # the workspace's own crates: "Files: *"
            crate = (user["crate"]["name"], user["crate"]["version"])
            packages[crate] = user["crate"]
            if name not in per_crate[crate]:
                per_crate[crate].append(name)
            crate_texts[crate].append((lic["id"], lic["text"]))

    out = [HEADER.format(tool=tool)]
    for crate in sorted(per_crate):
        package = packages[crate]
        # Apache-2.0 texts are the license's own; the notices are in the others.
        holders = [n for lic_id, text in crate_texts[crate] if lic_id != "Apache-2.0" for n in notices(text)]
        holders = list(dict.fromkeys(holders)) or package.get("authors") or [f"the {crate[0]} authors"]
        holders = [re.sub(r"^copyright\s*(?:\(c\)|©)?\s*", "", h, flags=re.IGNORECASE) or h for h in holders]
        out.append(f"Files: crates.io/{crate[0]}-{crate[1]}/*")
        out.append("Copyright: " + "\n ".join(dict.fromkeys(holders)))
        out.append("License: " + " and ".join(sorted(per_crate[crate])))
        declared = package.get("license") or "no license field"
        out.append(f"Comment: {crate[0]} {crate[1]}, declared license: {declared}")
        out.append("")
    out.append(APACHE)
    for name in sorted(texts):
        out.append(f"License: {name}\n{field_text(texts[name])}\n")
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> int:
    tool = sys.argv[1] if len(sys.argv) > 1 else "cargo-about"
    sys.stdout.write(render(json.load(sys.stdin), tool))
    return 0


if __name__ == "__main__":
    sys.exit(main())
