"""The README's example runs as written (a stale README is a bug)."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102
    losses = namespace["result"].losses
    assert losses[-50:].mean() < losses[:50].mean()  # it trained
    assert "credited with" in capsys.readouterr().out
