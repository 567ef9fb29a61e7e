"""A griffe extension (mkdocstrings loads it, see mkdocs.yml) that turns the reST-ish markup of
scgjax's docstrings into Markdown before they are rendered, without touching the docstrings:

- ``double backticks`` become `single backticks` (a code span);
- Sphinx roles, :func:`sample`, :class:`~scgjax.errors.SiteError`, :meth:`init`, become code
  links to the documented object, resolved in the scope of the docstring's object (``~``
  shortens the title to the last name). A role whose target the site does not document stays
  code without a link (an *optional* cross-reference: never a broken link);
- a paragraph ending with ``::`` ends with ``:`` and the indented block after it is code;
- an ``Example:`` section becomes ``Examples:``, the section whose doctest griffe renders as
  code (``Example:`` is an admonition to it, shown as prose);
- an ``Args:`` entry for several parameters (``model, guide: ...``) becomes one per parameter.

Doctest lines (``>>>``, ``...`` and their output) and literal blocks are left as they are.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(func|class|meth|attr|mod|data|obj|exc|const):`(~|!)?([^`<>]+?)(\(\))?`")
_DOUBLE = re.compile(r"``(.+?)``", flags=re.S)
_EXAMPLE = re.compile(r"^([ \t]*)Example:[ \t]*(\S.*)?$")


def normalise_examples(text: str) -> str:
    """``Example:`` is an admonition for griffe's Google parser (its doctest shown as prose);
    ``Examples:`` is the section whose ``>>>`` lines it renders as code. ``Example: a title``
    becomes ``Examples:`` with the title as the section's first line, and the block under it
    is dedented to the section's indentation."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _EXAMPLE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group(1)
        out.append(f"{indent}Examples:")
        i += 1
        if m.group(2):  # the title, and its continuation lines up to a blank line
            out.append(f"{indent}    {m.group(2)}")
            while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith(">>>"):
                out.append(f"{indent}    {lines[i].strip()}")
                i += 1
        block = []
        while i < len(lines) and (not lines[i].strip()
                                  or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            block.append(lines[i])
            i += 1
        depths = [len(line) - len(line.lstrip()) for line in block if line.strip()]
        shift = max(0, min(depths) - len(indent) - 4) if depths else 0
        out.extend(line[shift:] if line.strip() else line for line in block)
    return "\n".join(out)


def _segments(text: str) -> list[tuple[bool, str]]:
    """Split a docstring into (is_code, text) runs: doctest blocks and RST literal blocks are
    code, everything else prose."""
    out: list[tuple[bool, list[str]]] = []

    def add(is_code: bool, line: str) -> None:
        if out and out[-1][0] == is_code:
            out[-1][1].append(line)
        else:
            out.append((is_code, [line]))

    literal_indent: int | None = None   # inside a literal block opened by '::'
    in_doctest = False
    for line in text.split("\n"):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if literal_indent is not None:
            if not stripped or indent > literal_indent:
                add(True, line)
                continue
            literal_indent = None
        if in_doctest:
            if stripped:
                add(True, line)
                continue
            in_doctest = False
        if stripped.startswith(">>>"):
            in_doctest = True
            add(True, line)
            continue
        if stripped.endswith("::") and not stripped.startswith(".."):
            body = line.rstrip()[:-2].rstrip()
            add(False, body + ":" if body.strip() else "")
            literal_indent = indent
            continue
        add(False, line)
    return [(is_code, "\n".join(lines)) for is_code, lines in out]


_SHARED_ARG = re.compile(r"^(\s+)([A-Za-z_]\w*(?:,\s*[A-Za-z_]\w*)+):\s(.*)$")
_SECTION_TITLE = re.compile(r"^(\s*)([A-Z][A-Za-z ]*):\s*$")


def split_shared_args(text: str) -> str:
    """``model, guide: the programs`` in an ``Args:`` section (one entry for two parameters,
    which griffe reports as an unknown parameter) becomes one entry per parameter."""
    lines = text.split("\n")
    out: list[str] = []
    args_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        title = _SECTION_TITLE.match(line)
        if title:
            args_indent = (len(title.group(1)) if title.group(2) in ("Args", "Arguments",
                                                                     "Parameters") else None)
        m = _SHARED_ARG.match(line)
        if m and args_indent is not None and len(m.group(1)) > args_indent:
            indent = len(m.group(1))
            rest = []
            while i + 1 < len(lines) and lines[i + 1].strip() and (
                    len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent):
                i += 1
                rest.append(lines[i])
            for name in re.split(r",\s*", m.group(2)):
                out.append(f"{m.group(1)}{name}: {m.group(3)}")
                out.extend(rest)
        else:
            out.append(line)
        i += 1
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring of the loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self._collection = loader.modules_collection
        # where the API pages document an object: "scgjax.SVI" for the class defined in
        # scgjax.infer.svi (the pages render `::: scgjax.NAME` for each NAME in __all__)
        self._public: dict[str, str] = {}
        for name, member in pkg.members.items():
            if name.startswith("_"):
                continue
            try:
                canonical = member.final_target.path if member.is_alias else member.path
            except Exception:  # noqa: BLE001 (an alias to something outside the package)
                continue
            self._public.setdefault(canonical, f"{pkg.path}.{name}")
        self._visit(pkg, seen=set())

    def _visit(self, obj: griffe.Object | griffe.Alias, seen: set[str]) -> None:
        if obj.is_alias:
            return  # documented where it is defined (the alias shares its docstring)
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self._convert(obj.docstring.value, obj)
        for member in list(obj.members.values()):
            self._visit(member, seen)

    def _lookup(self, path: str) -> griffe.Object | griffe.Alias | None:
        try:
            return self._collection.get_member(path)
        except Exception:  # noqa: BLE001
            return None

    def _resolve(self, target: str, obj: griffe.Object) -> str | None:
        """The path of ``target`` as seen from ``obj``: absolute, or relative to the object,
        its parents, or the top package."""
        candidates = [target]
        scope: griffe.Object | None = obj
        while scope is not None:
            candidates.append(f"{scope.path}.{target}")
            scope = scope.parent
        for path in candidates:
            found = self._lookup(path)
            if found is None:
                continue
            try:
                canonical = found.final_target.path if found.is_alias else found.path
            except Exception:  # noqa: BLE001
                canonical = path
            head, rest = canonical, ""
            # the longest documented prefix: scgjax.infer.svi.SVI.init -> scgjax.SVI.init
            while head:
                if head in self._public:
                    return self._public[head] + rest
                head, _, last = head.rpartition(".")
                rest = f".{last}{rest}"
            return canonical
        return None

    def _role(self, match: re.Match, obj: griffe.Object) -> str:
        tilde, target, parens = match.group(2), match.group(3).strip(), match.group(4) or ""
        title = (target.rsplit(".", 1)[-1] if tilde == "~" else target) + parens
        code = f"<code>{html.escape(title)}</code>"
        path = self._resolve(target, obj)
        if path is None:
            return code
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    def _convert(self, text: str, obj: griffe.Object) -> str:
        parts = []
        for is_code, chunk in _segments(normalise_examples(text)):
            if not is_code:
                chunk = _ROLE.sub(lambda m: self._role(m, obj), chunk)
                chunk = _DOUBLE.sub(lambda m: "`" + m.group(1) + "`", chunk)
                chunk = split_shared_args(chunk)
                chunk = chunk.replace("\\ ", "")  # reST's escaped space ("``jax.Array``\\ s")
            parts.append(chunk)
        return "\n".join(parts)
