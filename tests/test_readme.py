"""Every Python example in README.md runs, in order, in one namespace."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run(tmp_path, monkeypatch):
    assert len(BLOCKS) >= 2
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for i, source in enumerate(BLOCKS, 1):
        exec(compile(source, f"README.md python block {i}", "exec"), namespace)
