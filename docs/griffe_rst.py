"""A griffe extension for the API reference: jbn's docstrings as Markdown.

jbn's docstrings are Google style with a few reStructuredText habits that
Markdown would misread: ``:func:`name``` roles, and examples introduced by a
paragraph ending in ``::`` (or bare ``>>>`` lines). This rewrites them before
mkdocstrings parses the docstring: roles become inline code, examples become
fenced ``pycon`` (or ``python``) blocks. Docstrings already in Markdown pass
through unchanged.

A few docstrings are completed at import time: the ``<jbn options>`` line of
``bn_forward`` and the layers becomes the options' ``Args:`` entries
(``jbn._options.document``). For those the extension takes the docstring of the
imported object, as ``help()`` shows it, so the build imports jbn.

Loaded by ``mkdocs.yml`` (``extensions:``).
"""

from __future__ import annotations

import inspect
import re

import griffe

_COMPLETED_AT_IMPORT = "<jbn options>"  # jbn._options.MARKER

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|obj|data|exc|const):`~?([^`]+)`")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fence(block: list[str], indent: int) -> list[str]:
    """The lines of ``block`` (no blank line at either end) as one fenced block."""
    common = min(_indent(line) for line in block if line.strip())
    language = "pycon" if block[0].lstrip().startswith(">>>") else "python"
    pad = " " * indent
    body = [pad + line[common:] if line.strip() else "" for line in block]
    return [pad + "```" + language, *body, pad + "```"]


def to_markdown(text: str) -> str:
    """Rewrites reST roles and literal/doctest blocks of ``text`` as Markdown."""
    text = _ROLE.sub(r"`\1`", text)
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.endswith("::") and not stripped.startswith("```"):
            # "text::" -> "text:" and the indented block after it, fenced.
            indent = _indent(line)
            out.append(line.rstrip()[:-1] if stripped != "::" else "")
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            block: list[str] = []
            while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > indent):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
            if block:
                out += ["", *_fence(block, indent), ""]
                i = j
                continue
            i += 1
            continue
        if stripped.startswith(">>>"):
            # A bare doctest: the lines up to the next blank line.
            indent = _indent(line)
            j = i
            while j < len(lines) and lines[j].strip():
                j += 1
            out += [*_fence(lines[i:j], indent)]
            i = j
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class RestToMarkdown(griffe.Extension):
    """Rewrites each docstring with ``to_markdown`` when griffe loads it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is None:
            return
        text = obj.docstring.value
        if _COMPLETED_AT_IMPORT in text:
            text = inspect.cleandoc(griffe.dynamic_import(obj.path).__doc__)
        obj.docstring.value = to_markdown(text)
