"""Unit tests of import_graph.py on small crates written to a temp dir.

    python3 -m unittest discover -s tests/tools
"""

import io
import tempfile
import textwrap
import unittest
from contextlib import redirect_stdout
from pathlib import Path

import import_graph as ig


def write_crate(root: Path, files: dict[str, str]) -> Path:
    src = root / "src"
    for name, text in files.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return src


class Parsing(unittest.TestCase):
    def test_use_lines_and_paths_are_references(self):
        names = ig.referenced_names(
            "use crate::config::Config;\n"
            "use crate::metrics::{self, Metrics};\n"
            "fn f() { crate::outbox::push(); }\n"
        )
        self.assertEqual(names, {"config", "metrics", "outbox"})

    def test_grouped_use_names_every_module(self):
        names = ig.referenced_names("use crate::{\n    client::{CloseReason, X},\n    link::Link,\n    Config,\n};\n")
        self.assertEqual(names, {"client", "link", "Config"})

    def test_comments_and_strings_are_not_references(self):
        names = ig.referenced_names(
            "//! See [`crate::gateway`].\n"
            "/// Built by crate::admin.\n"
            "/* crate::listener /* nested crate::tls */ */\n"
            'const S: &str = "crate::topics";\n'
            'const R: &str = r#"crate::registry"#;\n'
            "const C: char = '\"';\n"
            "use crate::config;\n"
        )
        self.assertEqual(names, {"config"})

    def test_strip_comments_keeps_lines(self):
        src = "a // x\n/* b\nc */ d\n\"e\nf\"\n"
        self.assertEqual(ig.strip_comments(src).count("\n"), src.count("\n"))


class Graphs(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.root = Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def test_modules_edges_and_root_reexports(self):
        src = write_crate(
            self.root,
            {
                "lib.rs": "pub mod a;\npub mod b;\npub mod c;\npub use b::Thing;\nuse crate::a::X;\n",
                "a.rs": "use crate::Thing;\n",
                "b.rs": "use super::*;\n",
                "c/mod.rs": "mod d;\n",
                "c/d.rs": "use crate::a::X;\nuse crate::c::Y;\n",
                "main.rs": "use crate::c::Z;\n",
            },
        )
        g = ig.crate_graph(src)
        self.assertEqual(g.modules, {"a", "b", "c"})
        # lib.rs and main.rs are roots, not modules; a module's own name is no edge.
        self.assertEqual(g.edges, {("a", "b"), ("c", "a")})

    def test_strongly_connected_components(self):
        comps = ig.sccs({"a", "b", "c", "d", "e"}, {("a", "b"), ("b", "c"), ("c", "a"), ("d", "e"), ("e", "d"), ("c", "d")})
        self.assertEqual(comps, [["a", "b", "c"], ["d", "e"]])
        self.assertEqual(ig.sccs({"a", "b"}, {("a", "b")}), [["a"], ["b"]])


def graph(edges):
    return ig.Graph(modules={m for e in edges for m in e}, edges=set(edges))


class Ratchet(unittest.TestCase):
    LAYERS = ["low", "mid", "high"]

    def test_downward_imports_pass(self):
        r = ig.check("k", graph([("high", "mid"), ("mid", "low")]), {"layers": self.LAYERS})
        self.assertTrue(r.ok)
        self.assertEqual(r.components, [])

    def test_new_upward_import_fails(self):
        r = ig.check("k", graph([("low", "high")]), {"layers": self.LAYERS})
        self.assertFalse(r.ok)
        self.assertEqual(r.new_upward, [("low", "high")])

    def test_listed_upward_import_passes(self):
        r = ig.check("k", graph([("low", "high")]), {"layers": self.LAYERS, "known_upward": ["low -> high"]})
        self.assertTrue(r.ok)

    def test_new_circle_fails_even_inside_one_layer(self):
        r = ig.check("k", graph([("a", "b"), ("b", "a")]), {"layers": ["a b"]})
        self.assertFalse(r.ok)
        self.assertEqual(r.new_cycle, [("a", "b"), ("b", "a")])
        self.assertEqual(r.components, [["a", "b"]])

    def test_listed_edge_that_is_gone_fails_until_removed(self):
        spec = {"layers": self.LAYERS, "known_upward": ["low -> high"], "known_cycle": ["mid -> low"]}
        r = ig.check("k", graph([("high", "low")]), spec)
        self.assertFalse(r.ok)
        self.assertEqual(r.gone_upward, [("low", "high")])
        self.assertEqual(r.gone_cycle, [("mid", "low")])

    def test_module_in_no_layer_fails(self):
        r = ig.check("k", graph([("high", "new")]), {"layers": self.LAYERS})
        self.assertEqual(r.unlayered, ["new"])
        self.assertFalse(r.ok)

    def test_malformed_edge_is_an_error(self):
        with self.assertRaises(ValueError):
            ig.check("k", graph([]), {"layers": [], "known_upward": ["a b"]})


class Main(unittest.TestCase):
    def test_exit_code_and_summary_follow_the_ratchet(self):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            write_crate(root / "k", {"lib.rs": "", "low.rs": "use crate::high::X;\n", "high.rs": ""})
            ratchet = root / "r.toml"
            ratchet.write_text('[k]\nsrc = "k/src"\nlayers = ["low", "high"]\n')
            out = io.StringIO()
            with redirect_stdout(out):
                self.assertEqual(ig.main(["--ratchet", str(ratchet), "--root", str(root)]), 1)
            self.assertIn("new upward import: low -> high", out.getvalue())
            ratchet.write_text('[k]\nsrc = "k/src"\nlayers = ["low", "high"]\nknown_upward = ["low -> high"]\n')
            out = io.StringIO()
            with redirect_stdout(out):
                self.assertEqual(ig.main(["--ratchet", str(ratchet), "--root", str(root)]), 0)
            self.assertIn("import graph: 1 crate(s) ok, 0 failing", out.getvalue())


if __name__ == "__main__":
    unittest.main()
