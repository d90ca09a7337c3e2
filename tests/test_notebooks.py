"""notebooks/*.ipynb are what scripts/make_notebooks.py writes, apart from outputs, and they are committed executed.

After changing a notebook's cells in the script, regenerate them with ``python scripts/make_notebooks.py --execute``.
(The notebooks themselves run under pytest through nbmake.)
"""

import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).parents[1]
NOTEBOOKS = ROOT / "notebooks"
REGENERATE = "regenerate with: python scripts/make_notebooks.py --execute"


def generator():
    """scripts/make_notebooks.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "scripts" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATED = generator().notebooks()


def committed(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str, str]]:
    return [(cell.id, cell.cell_type, cell.source) for cell in notebook.cells]


def test_every_committed_notebook_is_generated():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(GENERATED)


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_a_committed_notebook_has_the_generated_cells(name):
    notebook = committed(name)
    assert cells(notebook) == cells(GENERATED[name]), f"notebooks/{name} differs from its generator; {REGENERATE}"
    assert notebook.metadata.kernelspec == GENERATED[name].metadata.kernelspec


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_a_committed_notebook_shows_its_outputs_and_figures(name):
    code = [cell for cell in committed(name).cells if cell.cell_type == "code"]
    # executed once, top to bottom, without errors
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), f"notebooks/{name}: {REGENERATE}"
    outputs = [output for cell in code for output in cell.outputs]
    assert [o for o in outputs if o.output_type == "error"] == []
    assert any("image/png" in o.get("data", {}) for o in outputs), f"notebooks/{name} has no figure; {REGENERATE}"


def test_execute_stores_outputs_and_figures():
    notebook = new_notebook(
        cells=[
            new_code_cell("import os\nprint(os.path.basename(os.getcwd()))"),
            new_code_cell("import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()"),
        ]
    )
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    generator().execute(notebook, timeout=120)
    first, second = notebook.cells
    assert [first.execution_count, second.execution_count] == [1, 2]
    assert first.outputs[0].text == "notebooks\n"  # the kernel starts in notebooks/
    assert any("image/png" in o.get("data", {}) for o in second.outputs)
