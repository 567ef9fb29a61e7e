"""The documentation site (mkdocs.yml, docs/) covers the public API and includes only files
that exist: the cheap checks of what would break ``mkdocs build --strict`` (which .ci/run
also runs)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import scgjax

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_LINE = re.compile(r"^:::\s+scgjax\.([A-Za-z_][A-Za-z0-9_]*)\s*$", flags=re.M)
SNIPPET = re.compile(r'^\s*--8<--\s+"([^"]+)"\s*$', flags=re.M)
SECTION = re.compile(r"<!--\s*include-section:\s*(?P<file>[^|]+?)\s*\|\s*(?P<heading>.+?)\s*-->")


def api_entries() -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        for name in API_LINE.findall(page.read_text()):
            entries.setdefault(name, []).append(page.name)
    return entries


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "snippets" not in p.parts)


def test_every_public_name_has_an_api_entry():
    entries = api_entries()
    missing = [name for name in scgjax.__all__ if name not in entries]
    assert not missing, (
        f"names of scgjax.__all__ missing from the API reference: {missing}; add a line "
        "'::: scgjax.NAME' to the page of docs/api/ of its group")


def test_api_entries_are_public_names():
    unknown = [name for name in api_entries() if name not in scgjax.__all__]
    assert not unknown, f"docs/api/ documents names that are not in scgjax.__all__: {unknown}"


def test_each_name_is_documented_once():
    twice = {name: where for name, where in api_entries().items() if len(where) > 1}
    assert not twice, f"documented on several API pages: {twice}"


def test_the_hooks_read_all_as_python_does():
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    assert hooks.public_names() == list(scgjax.__all__)
    assert hooks.missing_api_names() == []
    for page in pages():  # every README/BENCHMARKS section a page includes exists
        for m in SECTION.finditer(page.read_text()):
            text, _ = hooks.section(m.group("file"), m.group("heading"))
            assert text.strip(), f"{page.name}: the section {m.group(0)} is empty"


def test_included_files_exist():
    missing = []
    for page in pages():
        for target in SNIPPET.findall(page.read_text()):
            path = target.split(":")[0]
            if not (ROOT / path).is_file():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing, f"--8<-- includes of files that do not exist: {missing}"


def test_every_graph_and_output_shown_is_stored():
    """Each docs/snippets/NAME.py has its printed output, and each image a page shows exists
    (docs/scripts/render_snippets.py makes them)."""
    snippets = DOCS / "snippets"
    for script in snippets.glob("*.py"):
        assert (snippets / f"{script.stem}.out").is_file(), (
            f"run: python docs/scripts/render_snippets.py {script.stem}")
    for page in pages():
        for image in re.findall(r"!\[[^\]]*\]\(([^)\s]+\.svg)\)", page.read_text()):
            assert (page.parent / image).resolve().is_file(), f"{page.name}: {image}"
