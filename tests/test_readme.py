"""Every Python snippet of README.md runs as written, in order, in one
namespace (later snippets use what earlier ones defined, as a reader who
pastes them into one session would), in a scratch folder."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippets():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_python_snippets_run(tmp_path, monkeypatch, capsys):
    snippets = _snippets()
    assert len(snippets) >= 4
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for i, code in enumerate(snippets):
        exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
    assert namespace["out"].shape[1] > 600 and os.path.isfile(tmp_path / "out" / "config.json")
    assert namespace["q"].shape == (1, 32, 1000, 128)  # the cache snippet's own tensors
    ratio = float(capsys.readouterr().out.split()[0])
    assert ratio > 1.0  # decisions flag 80% of tokens: the cache holds fewer than it saw
