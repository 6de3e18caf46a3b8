"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block_after(marker: str) -> str:
    text = README.read_text()
    start = text.index(marker)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_search_on_your_own_data_runs_as_written(tmp_path, monkeypatch, capsys):
    code = _block_after("To search on your own data and network")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    out = tmp_path / "runs" / "mysearch"
    assert (out / "schedule.json").is_file() and (out / "search.json").is_file()
    best = float(capsys.readouterr().out.strip().splitlines()[-1].split()[0])
    assert best > 0.5  # 4 well-separated colours: far above chance (0.25) even after 4 epochs
    # the registrations are the README's own: unregister them for the other tests of this process
    from rolekd.data.datasets import DATASETS
    from rolekd.models import registry

    DATASETS.remove("mydata")
    registry._MODELS.remove("mynet")
