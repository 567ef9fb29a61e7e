"""MkDocs hooks of the scgjax site (mkdocs.yml: ``hooks: [docs/hooks.py]``).

At build time, without executing or downloading anything:

- **API coverage.** Every name of ``scgjax.__all__`` (read from ``scgjax/__init__.py``) must
  have a ``::: scgjax.NAME`` line on a page of ``docs/api/``; a missing one fails the build
  (``tests/test_docs.py`` checks the same against the imported package).
- **Notebooks.** Each ``notebooks/NAME.ipynb`` becomes the page ``examples/NAME/``, listed
  under "Examples" in the navigation. The page shows ``docs/examples/NAME.ipynb`` (a copy
  run once in quick mode by ``docs/scripts/run_notebooks.py``) while that copy's code cells
  are the notebook's, and the notebook itself, without outputs, once they differ. The
  gallery table (``<!-- notebook-gallery -->`` in ``docs/examples/index.md``) says which.
- **Figures.** ``bench/results/figures/*.png`` are published as ``figures/*.png``, where the
  benchmark result files included into the pages point.
- **Sections.** ``<!-- include-section: FILE | HEADING -->`` is replaced by the section of
  ``FILE`` (a Markdown file of the repository, e.g. ``README.md``) under that heading, up to
  the next heading of the same or a higher level, so the page follows the file as it
  changes. Relative links in it are rewritten for the page (benchmark figures) or turned
  into code (other repository files). Whole files are included with pymdownx.snippets
  (``--8<-- "bench/results/step.md"``).
"""

from __future__ import annotations

import ast
import json
import logging
import posixpath
import re
import shutil
import tempfile
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.scgjax")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOTEBOOKS = ROOT / "notebooks"
FIGURES = ROOT / "bench" / "results" / "figures"

_API_LINE = re.compile(r"^:::\s+scgjax\.([A-Za-z_][A-Za-z0-9_]*)\s*$", flags=re.M)
_SECTION = re.compile(r"<!--\s*include-section:\s*(?P<file>[^|]+?)\s*\|\s*(?P<heading>.+?)\s*-->")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


# ----------------------------------------------------------------------------- the API pages

def public_names() -> list[str]:
    """``scgjax.__all__``, read statically from ``scgjax/__init__.py`` (no JAX import)."""
    tree = ast.parse((ROOT / "scgjax" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise PluginError("scgjax/__init__.py defines no __all__")


def documented_names() -> dict[str, str]:
    """``{NAME: page}`` for each ``::: scgjax.NAME`` line of ``docs/api/*.md``."""
    found: dict[str, str] = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        for name in _API_LINE.findall(page.read_text()):
            found.setdefault(name, page.name)
    return found


def missing_api_names() -> list[str]:
    documented = documented_names()
    return [name for name in public_names() if name not in documented]


# ----------------------------------------------------------------------------- notebooks

def _notebook(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return ("".join(source) if isinstance(source, list) else source).strip()


def code_cells(path: Path) -> list[str]:
    return [_source(c) for c in _notebook(path)["cells"] if c["cell_type"] == "code"]


def notebook_title(path: Path) -> str:
    for cell in _notebook(path)["cells"]:
        if cell["cell_type"] == "markdown":
            for line in _source(cell).splitlines():
                if line.startswith("# "):
                    return re.sub(r"[`*]", "", line[2:]).strip()
    return path.stem.replace("_", " ")


def nav_title(path: Path) -> str:
    """A short title for the navigation: the notebook's title up to its colon (or, when
    that is too short to say anything, up to its first comma)."""
    title = notebook_title(path)
    head, colon, _ = title.partition(":")
    if colon and len(head) >= 10:
        return head.strip()
    return title.split(",")[0].strip()


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def copy_is_current(name: str) -> bool:
    copy = DOCS / "examples" / f"{name}.ipynb"
    return copy.is_file() and code_cells(copy) == code_cells(NOTEBOOKS / f"{name}.ipynb")


def notebook_descriptions() -> dict[str, str]:
    """``{NAME: what it shows}`` from the table of ``notebooks/README.md``."""
    readme = NOTEBOOKS / "README.md"
    out: dict[str, str] = {}
    if readme.is_file():
        for m in re.finditer(r"^\|\s*`([\w-]+)\.ipynb`\s*\|\s*(.*?)\s*\|\s*$", readme.read_text(),
                             flags=re.M):
            out[m.group(1)] = m.group(2)
    return out


def gallery_table() -> str:
    descriptions = notebook_descriptions()
    rows = ["| notebook | what it shows | outputs on this site |", "|---|---|---|"]
    for path in notebooks():
        name = path.stem
        outputs = ("quick-mode run" if copy_is_current(name)
                   else "none (not run for the docs)")
        rows.append(f"| [{notebook_title(path)}]({name}.ipynb) | "
                    f"{descriptions.get(name, '')} | {outputs} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- sections

def section(file: str, heading: str) -> tuple[str, Path]:
    path = (ROOT / file).resolve()
    if ROOT not in path.parents or not path.is_file():
        raise PluginError(f"include-section: no file {file!r} in the repository")
    lines = path.read_text(encoding="utf-8").splitlines()
    start = level = None
    in_fence = False
    body: list[str] = []
    for line in lines:
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        m = None if in_fence else _HEADING.match(line)
        if start is None:
            if m and m.group(2).strip() == heading:
                start, level = True, len(m.group(1))
            continue
        if m and len(m.group(1)) <= level:
            break
        body.append(line)
    if start is None:
        raise PluginError(f"include-section: {file} has no heading {heading!r}")
    return "\n".join(body).strip("\n"), path


def rewrite_links(text: str, source: Path, page_uri: str) -> str:
    """Relative links of an included file, made right for the page that includes it."""
    page_dir = posixpath.dirname(page_uri)

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^[a-z]+:|^#|^/", target):
            return m.group(0)
        repo_path = (source.parent / target).resolve()
        try:
            rel = repo_path.relative_to(FIGURES)
        except ValueError:
            shown = repo_path.relative_to(ROOT) if ROOT in repo_path.parents else target
            label = m.group(1)[:-2].lstrip("!").lstrip("[")
            return f"{label} (`{shown}`)" if label else f"`{shown}`"
        uri = posixpath.join("figures", rel.as_posix())
        return m.group(1) + posixpath.relpath(uri, page_dir or ".") + m.group(3)

    return _LINK.sub(fix, text)


# ----------------------------------------------------------------------------- the hooks

def on_config(config, **kwargs):
    missing = missing_api_names()
    if missing:
        raise PluginError(
            "names of scgjax.__all__ with no '::: scgjax.NAME' line on a page of docs/api/: "
            + ", ".join(missing))
    for entry in config["nav"]:
        if isinstance(entry, dict) and "Examples" in entry:
            section_nav = entry["Examples"]
            section_nav[:] = [e for e in section_nav if not (
                isinstance(e, dict) and str(next(iter(e.values()))).endswith(".ipynb"))]
            section_nav.extend({nav_title(p): f"examples/{p.stem}.ipynb"} for p in notebooks())
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which wraps the notebook pages
def on_files(files: Files, config, **kwargs):
    names = {p.stem for p in notebooks()}
    for file in list(files):
        m = re.fullmatch(r"examples/([\w-]+)\.ipynb", file.src_uri)
        if m and (m.group(1) not in names or not copy_is_current(m.group(1))):
            if m.group(1) in names:
                log.info("docs/examples/%s.ipynb is out of date: showing notebooks/%s.ipynb "
                         "without outputs (python docs/scripts/run_notebooks.py %s)",
                         m.group(1), m.group(1), m.group(1))
            files.remove(file)
    for name in sorted(names):
        uri = f"examples/{name}.ipynb"
        if files.get_file_from_path(uri) is None:
            # a real file under a src_dir of its own: mkdocs-jupyter's page wrapper reads
            # src_dir/src_uri (File.generated would leave it without a path)
            staged = _staging() / uri
            staged.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(NOTEBOOKS / f"{name}.ipynb", staged)
            files.append(File(uri, str(_staging()), config["site_dir"],
                              config["use_directory_urls"]))
    for png in sorted(FIGURES.glob("*.png")):
        uri = f"figures/{png.name}"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files


_STAGING: list[Path] = []


def _staging() -> Path:
    if not _STAGING:
        _STAGING.append(Path(tempfile.mkdtemp(prefix="scgjax-docs-")))
    return _STAGING[0]


def on_post_build(config, **kwargs):
    while _STAGING:
        shutil.rmtree(_STAGING.pop(), ignore_errors=True)


def on_page_markdown(markdown: str, page, config, files, **kwargs):
    def include(m: re.Match) -> str:
        text, source = section(m.group("file"), m.group("heading"))
        return rewrite_links(text, source, page.file.src_uri)

    markdown = _SECTION.sub(include, markdown)
    if "<!-- notebook-gallery -->" in markdown:
        markdown = markdown.replace("<!-- notebook-gallery -->", gallery_table())
    return markdown
