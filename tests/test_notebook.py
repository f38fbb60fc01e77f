"""notebooks/example_inference.ipynb runs top to bottom on the CPU with the
built-in tiny model (any cell error fails), draws the compression heatmap,
and its multi-turn chat on one cache matches a one-shot prefill."""

import base64
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "example_inference.ipynb")
PNG = b"\x89PNG\r\n\x1a\n"


def _stdout(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.slow
def test_notebook_runs_and_draws_the_heatmap(tmp_path, monkeypatch):
    monkeypatch.delenv("DMS_NOTEBOOK_MODEL", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any cell error

    heat = next(c for c in nb.cells if c.cell_type == "code" and "plot_compression_heatmap" in c.source)
    images = [base64.b64decode(o.data["image/png"]) for o in heat.outputs if "image/png" in o.get("data", {})]
    assert images and images[0][:8] == PNG
    assert (tmp_path / "compression_heatmap.png").read_bytes()[:8] == PNG
    assert (tmp_path / "cache_timeline.png").read_bytes()[:8] == PNG
    assert "heatmap array (layers x KV heads): (4, 2)" in _stdout(heat)

    text = "".join(_stdout(c) for c in nb.cells if c.cell_type == "code")
    assert "same reply as a one-shot prefill of the conversation: True" in text
    assert "same compression per layer: True" in text
    assert "dense (eviction off)" in text
