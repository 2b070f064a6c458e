"""Unit tests of doc_links.py on small Markdown trees written to a temp dir.

    python3 -m unittest discover -s tests/tools
"""

import tempfile
import textwrap
import unittest
from pathlib import Path

import doc_links as dl


class Slugs(unittest.TestCase):
    def test_github_slugs(self):
        self.assertEqual(dl.slug("Upgrading in place: `edgegate upgrade`"), "upgrading-in-place-edgegate-upgrade")
        self.assertEqual(dl.slug("Preflight: edgegate tune --check"), "preflight-edgegate-tune---check")
        self.assertEqual(dl.slug("EdgeGatePollDelayHigh"), "edgegatepolldelayhigh")
        self.assertEqual(dl.slug("See [the lab](lab.md) (VM)"), "see-the-lab-vm")

    def test_repeated_headings_are_numbered(self):
        found = dl.anchors("# Notes\n## Notes\n### Notes\n")
        self.assertEqual(found, {"notes", "notes-1", "notes-2"})

    def test_html_anchors_and_no_headings_in_code(self):
        found = dl.anchors('<a id="custom"></a>\n```sh\n# not a heading\n```\n# Real\n')
        self.assertEqual(found, {"custom", "real"})


class DeadLinks(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.repo = Path(self.tmp.name)
        (self.repo / "docs").mkdir()
        (self.repo / "docs" / "guide.md").write_text("# Guide\n## Tune a host\n")
        (self.repo / "docs" / "plot.png").write_bytes(b"\x89PNG")

    def tearDown(self):
        self.tmp.cleanup()

    def dead(self, markdown: str) -> list[str]:
        md = self.repo / "README.md"
        md.write_text(textwrap.dedent(markdown))
        return dl.dead_links(md, self.repo)

    def test_links_that_lead_somewhere(self):
        self.assertEqual(
            self.dead(
                """
                [guide](docs/guide.md), [tune](docs/guide.md#tune-a-host), ![plot](docs/plot.png "the plot")
                [folder](docs/) and [self](#top) and [web](https://example.invalid/x#y)

                # Top
                [ref]: docs/guide.md#guide
                """
            ),
            [],
        )

    def test_missing_file(self):
        problems = self.dead("Plot: ![plot](docs/missing.png)\n")
        self.assertEqual(len(problems), 1)
        self.assertIn("README.md:1: docs/missing.png: no such file", problems[0])

    def test_missing_anchor_in_other_file_and_in_this_one(self):
        problems = self.dead("[a](docs/guide.md#tuning) [b](#nowhere)\n")
        self.assertEqual(len(problems), 2)
        self.assertIn("no heading or anchor #tuning in guide.md", problems[0])
        self.assertIn("#nowhere", problems[1])

    def test_reference_definitions_are_checked(self):
        self.assertEqual(len(self.dead("[x][ref]\n\n[ref]: docs/gone.md\n")), 1)

    def test_code_is_not_a_link(self):
        self.assertEqual(self.dead("`[a](gone.md)`\n\n```md\n[b](gone.md)\n```\n"), [])

    def test_relative_to_the_linking_file(self):
        sub = self.repo / "docs" / "more.md"
        sub.write_text("[up](../README.md) [here](guide.md#guide) [bad](../guide.md)\n")
        (self.repo / "README.md").write_text("x\n")
        problems = dl.dead_links(sub, self.repo)
        self.assertEqual(len(problems), 1)
        self.assertIn("../guide.md", problems[0])


if __name__ == "__main__":
    unittest.main()
