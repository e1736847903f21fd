"""The docs: every Python example of every page runs, and every public name has an API entry.

Each page's ```python blocks run in order in one namespace of their own, as README's do
(tests/test_readme.py); a block fenced as ```py is shown but not run (e.g. one that needs two
processes). Page examples are kept small: each page runs in a few seconds.
"""

import importlib
import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text())
PUBLIC = ("jbn", "jbn.linen", "jbn.nnx", "jbn.equinox")


def blocks(page: pathlib.Path) -> list[str]:
    """The ```python blocks of a page, dedented (blocks may sit in list items)."""
    found = re.findall(r"^( *)```python\n(.*?)^\1```", page.read_text(), flags=re.S | re.M)
    return [
        "\n".join(line[len(indent) :] for line in source.splitlines()) for indent, source in found
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_run(page, tmp_path, monkeypatch):
    sources = blocks(page)
    assert sources
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs.{page.stem}"}
    # The pages are user code: NumPy's broadcasting rules, not conftest's "raise".
    with jax.numpy_rank_promotion("allow"):
        for i, source in enumerate(sources, 1):
            exec(compile(source, f"{page.relative_to(ROOT)} python block {i}", "exec"), namespace)


def test_pages_found():
    assert len(PAGES) >= 8


def api_entries() -> set[str]:
    text = "\n".join(p.read_text() for p in sorted((DOCS / "api").glob("*.md")))
    return set(re.findall(r"^::: *([\w.]+)", text, flags=re.M))


@pytest.mark.parametrize("module", PUBLIC)
def test_every_public_name_has_an_api_entry(module):
    names = importlib.import_module(module).__all__
    missing = [f"{module}.{name}" for name in names if f"{module}.{name}" not in api_entries()]
    assert not missing, f"no '::: NAME' entry in docs/api/*.md for {missing}"


def resolves(path: str) -> bool:
    """Whether ``module.name`` is an attribute of an importable module (PEP 562 names too)."""
    module, _, name = path.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def test_api_entries_are_public():
    # An entry for a name that is gone, or private, fails too.
    stale = [e for e in sorted(api_entries()) if not resolves(e) or "._" in f".{e}"]
    assert not stale, f"docs/api/*.md documents names that are not public: {stale}"


def test_lazy_names_have_an_api_entry():
    import jbn

    lazy = {n for n in dir(jbn) if not n.startswith("_")} - set(jbn.__all__)
    assert {"BatchNorm", "recalibrate_batch_stats"} <= lazy
    assert {"jbn.BatchNorm", "jbn.recalibrate_batch_stats"} <= api_entries()


def test_site_opens_from_disk_and_renders_math():
    """Pages are built as page.html and linked as such, so site/index.html opens in a browser
    from disk; $$ math goes through arithmatex to MathJax, and no formula is left in a code block."""
    config = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^use_directory_urls: false$", config, flags=re.M)
    assert "pymdownx.arithmatex" in config and "javascripts/mathjax.js" in config
    assert (DOCS / "javascripts" / "mathjax.js").is_file()
    for page in ("tutorial.md", "functional.md"):
        text = (DOCS / page).read_text()
        assert "$$" in text and "```text" not in text, page


def test_readme_names_setup_and_how_to_browse_the_docs():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "`make venv`" in readme and "make venv" in makefile.split("\n\n")[0]
    assert "site/index.html" in readme and "make docs-serve" in readme
    assert "http://127.0.0.1:8000" in readme


def test_index_tool_table_links_every_frontend_to_an_api_entry():
    """The index's tool × frontend table: a row per tool, every frontend cell a link to an API entry."""
    index = (DOCS / "index.md").read_text()
    table = index.split("## Every tool in every frontend", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= 10
    entries = api_entries()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for cell in cells[2:5]:  # linen, NNX, Equinox
            links = re.findall(r"\(api/\w+\.md#([\w.]+)\)", cell)
            assert links, f"no API link in {cell!r} of {row!r}"
            assert set(links) <= entries, f"{links} not all in docs/api: {row!r}"
