"""Unit tests of packaging/copyright.py (cargo-about's JSON to DEP-5) on a
small hand-made input.

    python3 -m unittest discover -s tests/tools
"""

import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "packaging"))
import copyright as cp  # noqa: E402

MIT_TOKIO = "MIT License\n\nCopyright (c) 2019 Tokio Contributors\n\nPermission is hereby granted...\nThe above copyright notice shall be included.\n"
MIT_OTHER = "Copyright 2016 Jane Doe\n\nPermission is hereby granted...\n"
APACHE = "Apache License\n(c) You must retain ... copyright notices\nCopyright {yyyy} {name of copyright owner}\n"


def crate(name, version, license, authors=(), source="registry+https://github.com/rust-lang/crates.io-index"):
    return {"name": name, "version": version, "license": license, "authors": list(authors), "source": source}


def lic(spdx, text, *crates):
    return {"id": spdx, "name": spdx, "text": text, "used_by": [{"crate": c, "path": None} for c in crates]}


class Render(unittest.TestCase):
    def setUp(self):
        tokio = crate("tokio", "1.47.1", "MIT")
        mio = crate("mio", "1.0.4", "MIT")
        serde = crate("serde", "1.0.228", "MIT OR Apache-2.0", ["Erick Tryzelaar <e@x>"])
        ring = crate("ring", "0.17.14", "Apache-2.0 AND ISC")
        ours = crate("edgegate-link", "0.1.0", "Apache-2.0", source=None)
        about = {
            "licenses": [
                lic("MIT", MIT_TOKIO, tokio),
                lic("MIT", MIT_OTHER, mio),
                lic("Apache-2.0", APACHE, serde, ring, ours),
                lic("ISC", "Copyright 2015 Brian Smith.\n\nPermission to use...\n", ring),
            ]
        }
        self.out = cp.render(about, "cargo-about 0.9.3")
        self.paragraphs = self.out.split("\n\n")

    def paragraph(self, first_line):
        return next(p for p in self.paragraphs if p.startswith(first_line))

    def test_one_paragraph_per_registry_crate_not_ours(self):
        files = [p.split("\n")[0] for p in self.paragraphs if p.startswith("Files: crates.io/")]
        self.assertEqual(
            files,
            [
                "Files: crates.io/mio-1.0.4/*",
                "Files: crates.io/ring-0.17.14/*",
                "Files: crates.io/serde-1.0.228/*",
                "Files: crates.io/tokio-1.47.1/*",
            ],
        )
        self.assertNotIn("edgegate-link", self.out)

    def test_copyright_from_the_notice_else_the_authors(self):
        self.assertIn("Copyright: 2019 Tokio Contributors", self.paragraph("Files: crates.io/tokio-"))
        # Apache's own "(c) You must retain" and its template are no notices.
        self.assertIn("Copyright: Erick Tryzelaar <e@x>", self.paragraph("Files: crates.io/serde-"))
        self.assertIn("Copyright: 2015 Brian Smith.", self.paragraph("Files: crates.io/ring-"))

    def test_each_distinct_text_once_variants_named_by_crate(self):
        self.assertIn("License: MIT\n", self.paragraph("Files: crates.io/mio-") + "\n")
        self.assertIn("License: MIT~tokio\n", self.paragraph("Files: crates.io/tokio-") + "\n")
        self.assertIn("License: Apache-2.0 and ISC\n", self.paragraph("Files: crates.io/ring-") + "\n")
        standalone = [p.split("\n")[0] for p in self.paragraphs if p.startswith("License: ")]
        self.assertEqual(standalone, ["License: Apache-2.0", "License: ISC", "License: MIT", "License: MIT~tokio"])

    def test_texts_are_continuation_lines(self):
        text = self.paragraph("License: MIT~tokio")
        self.assertEqual(text.split("\n")[1:4], [" MIT License", " .", " Copyright (c) 2019 Tokio Contributors"])
        self.assertIn("/usr/share/common-licenses/Apache-2.0", self.paragraph("License: Apache-2.0"))

    def test_notices(self):
        self.assertEqual(cp.notices("Copyright (c) 2019 A\n(c) You must retain\nthe above copyright notice\n© 2020 B\n"), ["Copyright (c) 2019 A", "© 2020 B"])


if __name__ == "__main__":
    unittest.main()
