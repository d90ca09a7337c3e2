"""Write the notebooks under notebooks/ from the cell sources below.

    python scripts/make_notebooks.py --execute   # run them too: the committed notebooks show outputs and figures
    python scripts/make_notebooks.py             # cell sources only, without outputs

tests/test_notebooks.py checks that the committed notebooks hold exactly these cells, outputs apart.
"""

import argparse
import copy
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"

QUICKSTART = [
    new_markdown_cell(
        "# advmim_pl quickstart: what the AEMIM plug-in feeds the auxiliary branch\n\n"
        "Pre-train a small ViT with MAE + AEMIM on the bundled Fashion-MNIST sample for 10 steps "
        "(under a minute on a laptop CPU), or load a checkpoint of your own by setting `CHECKPOINT`. "
        "Then look at one batch: the clean image, what the encoder sees, the reconstruction, the "
        "adversarial example and its perturbation (amplified), next to a random +-eps sign pattern of the "
        "same size (the energy-matched control)."
    ),
    new_code_cell(
        "import os\n"
        "import tempfile\n\n"
        "import matplotlib.pyplot as plt\n"
        "import torch\n\n"
        "from advmim_pl.adversarial import perturb\n"
        "from advmim_pl.cli import run\n"
        "from advmim_pl.mim.losses import upsample_mask\n"
        "from advmim_pl.modules import PretrainModule\n\n"
        "CHECKPOINT = None  # e.g. 'runs/advmim/version_0/checkpoints/last.ckpt'\n"
        "torch.manual_seed(0)"
    ),
    new_code_cell(
        "workdir = tempfile.mkdtemp()\n"
        "os.chdir(workdir)  # runs/ goes here\n"
        "cli = run(['fit', '-c', 'quickstart_adv.yaml', '--trainer.max_epochs', '1',\n"
        "            '--trainer.limit_train_batches', '10',  # 10 steps: a demonstration\n"
        "            '--trainer.limit_val_batches', '0',  # no validation: the online kNN monitor is not needed here\n"
        "            '--trainer.enable_progress_bar', 'false', '--data.init_args.num_workers', '0'])\n"
        "module, data = cli.model, cli.datamodule\n"
        "if CHECKPOINT:\n"
        "    module = PretrainModule.load_from_checkpoint(CHECKPOINT)  # method and weights from the file\n"
        "attack = module.plugin.attack  # the plug-in's generic PGD engine\n"
        "module.eval()\n"
        "print('final train loss', float(cli.trainer.callback_metrics['train/loss']))"
    ),
    new_code_cell(
        "x = next(iter(data.val_dataloader()))[0][:8]\n"
        "method, encoder = module.method, module.encoder\n"
        "mask = method.sample_mask(encoder, len(x), x.device, torch.Generator().manual_seed(0))\n"
        "with torch.no_grad():\n"
        "    latent = method.encode(encoder, x, mask)\n"
        "    reconstruction = method.to_image(method.decode(module.decoder, latent, mask), x, mask, encoder)\n"
        "objective = module.feature_objective(x, mask, latent)\n"
        "adversarial = attack.generate(module, x, objective).x_adv\n"
        "sign, _ = perturb('sign', objective, x, attack.eps, 0, generator=torch.Generator().manual_seed(0))\n"
        "with torch.no_grad():\n"
        "    distance = {name: objective(image).mean().item()\n"
        "                for name, image in [('clean', x), ('PGD', adversarial), ('random sign', sign)]}\n"
        "print('feature distance to the clean encoding (the objective the attack maximises):')\n"
        "for name, value in distance.items():\n"
        "    print(f'  {name:9s} {value:.5f}')\n"
        "for name, image in [('PGD', adversarial), ('random sign', sign)]:\n"
        "    print(f'L-inf size of {name}: {(image - x).abs().max().item():.4f}')\n"
        "assert distance['PGD'] > distance['random sign']"
    ),
    new_code_cell(
        "def amplified(delta):\n"
        "    return 0.5 + 0.5 * delta / delta.abs().max().clamp_min(1e-12)\n\n"
        "pixel_mask = upsample_mask(mask.patches, encoder.grid_size, encoder.patch_size)\n"
        "rows = {\n"
        "    'clean': x, 'masked': x * (1 - pixel_mask), 'reconstruction': reconstruction,\n"
        "    'adversarial': adversarial, 'PGD perturbation (amplified)': amplified(adversarial - x),\n"
        "    'random sign, same eps': sign, 'random sign (amplified)': amplified(sign - x),\n"
        "}\n"
        "fig, axes = plt.subplots(len(rows), len(x), figsize=(len(x), 1.15 * len(rows)))\n"
        "for r, (name, images) in enumerate(rows.items()):\n"
        "    for c, image in enumerate(images):\n"
        "        axes[r, c].imshow(image[0].detach(), cmap='gray', vmin=0, vmax=1)\n"
        "        axes[r, c].axis('off')\n"
        "    axes[r, 0].set_title(name, loc='left', fontsize=8)\n"
        "plt.tight_layout()\n"
        "plt.show()"
    ),
    new_markdown_cell(
        "With the default `attack_mask: none` the attacked encoder sees the whole image, so the PGD perturbation "
        "covers every patch, including the masked ones that the auxiliary loss scores. The random-sign control has "
        "the same size (RMS eps) and moves the features much less. (With `attack_mask: same` the masked patches "
        "would get no gradient and carry only the random start.)"
    ),
]

EVALUATE = [
    new_markdown_cell(
        "# advmim_pl evaluation: frozen features with their floors, then a probe's robustness\n\n"
        "Set `CHECKPOINT` to a pre-training `last.ckpt` of the quickstart encoder (from "
        "`advmim fit -c quickstart_adv.yaml`); left at `None`, the notebook pre-trains one for 10 steps on the "
        "bundled Fashion-MNIST sample first. It then runs the README's commands with shorter schedules:\n\n"
        "1. `advmim test -c eval/quickstart_features.yaml`: kNN and a converged logistic regression on the "
        "frozen cls token and patch average (here the L2 strength chosen from 3 values instead of the config's "
        "7, and the features of a class-balanced quarter of the 4,000 training images), beside the floors that "
        "say whether pre-training helped at all: a randomly initialised encoder of the "
        "same architecture and the raw pixels (here at 16 px instead of 32);\n"
        "2. a linear probe, scored on clean images, 11 corruptions at severities 1, 3 and 5 and PGD-10 at 2 and "
        "8 /255 through its own SGD-trained head, and beside it one readout for all: the converged logistic "
        "regression of step 1 on the probe's frozen encoder and on the same two floors, in their own columns and "
        "plotted with them."
    ),
    new_code_cell(
        "import json\n"
        "import os\n"
        "import tempfile\n\n"
        "import matplotlib.pyplot as plt\n"
        "from IPython.display import Markdown, display\n\n"
        "from advmim_pl.cli import run\n"
        "from advmim_pl.eval import CORRUPTIONS, RobustnessEvaluator\n"
        "from advmim_pl.eval.robust import pgd_eps\n\n"
        "CHECKPOINT = None  # e.g. '/path/to/runs/advmim/version_0/checkpoints/last.ckpt'\n"
        "QUIET = ['--trainer.enable_progress_bar', 'false', '--trainer.enable_model_summary', 'false',\n"
        "         '--data.init_args.num_workers', '0']\n"
        "os.chdir(tempfile.mkdtemp())  # runs/ goes here"
    ),
    new_code_cell(
        "if CHECKPOINT is None:\n"
        "    pretrain = run(['fit', '-c', 'quickstart_adv.yaml', '--trainer.max_epochs', '1',\n"
        "                    '--trainer.limit_train_batches', '10',  # short: the tools, not the method\n"
        "                    '--trainer.limit_val_batches', '0', *QUIET])  # step 1 scores it below\n"
        "    CHECKPOINT = pretrain.trainer.checkpoint_callback.last_model_path\n"
        "features = run(['test', '-c', 'eval/quickstart_features.yaml', '--model.init_args.init_from', CHECKPOINT,\n"
        "                '--model.init_args.logreg_c', '[0.01, 1, 100]', '--model.init_args.pixel_size', '16',\n"
        "                '--data.init_args.label_fraction', '0.25', *QUIET])  # 1,000 training images\n"
        "folder = features.trainer.log_dir  # features.md and features.json\n"
        "frozen = json.load(open(os.path.join(folder, 'features.json')))['results']\n"
        "display(Markdown(open(os.path.join(folder, 'features.md')).read()))"
    ),
    new_code_cell(
        "probe = run(['fit', '-c', 'quickstart_probe.yaml', '--model.init_args.init_from', CHECKPOINT,\n"
        "             '--trainer.max_epochs', '1', *QUIET])\n"
        "accuracy = float(probe.trainer.callback_metrics['val/acc1'])\n"
        "converged = frozen['encoder/token/logreg']['top1']\n"
        "print(f'linear probe top-1 on the 1,000 held-out images: {100 * accuracy:.2f}% '\n"
        "      f'(converged logistic regression on its cls token: {100 * converged:.2f}%)')\n"
        "probed = probe.trainer.checkpoint_callback.last_model_path\n"
        "severities = [1, 3, 5]  # of 1..5, and PGD at 2 and 8 /255 only: a shorter table\n"
        "table = run(['test', '-c', 'eval/quickstart_robustness.yaml', '--ckpt_path', probed,\n"
        "             '--trainer.limit_test_batches', '1', '--data.init_args.batch_size', '32',  # 32 test images\n"
        "             '--trainer.callbacks.init_args.floor_images', '500',\n"
        "             '--trainer.callbacks.init_args.floor_pixel_size', '16',\n"
        "             '--trainer.callbacks.init_args.severities', str(severities),\n"
        "             '--trainer.callbacks.init_args.pgd_eps', '[0.0078431373, 0.0313725490]', *QUIET])\n"
        "results = next(c for c in table.trainer.callbacks if isinstance(c, RobustnessEvaluator)).results\n"
        "display(Markdown(open(os.path.join(table.trainer.log_dir, 'robustness.md')).read()))"
    ),
    new_code_cell(
        "fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))\n"
        "curves = {'': ('linear probe, its SGD head (1 epoch)', '-'),\n"
        "          'logreg/encoder/': ('its encoder, logistic regression', '-.'),\n"
        "          'logreg/random/': ('random encoder, logistic regression', '--'),\n"
        "          'logreg/pixels/': ('raw pixels, logistic regression', ':')}\n"
        "for prefix, (label, style) in curves.items():\n"
        "    clean = 100 * results[f'{prefix}clean']\n"
        "    mean = [sum(results[f'{prefix}corruption/{c}/{s}'] for c in CORRUPTIONS) / len(CORRUPTIONS)\n"
        "            for s in severities]\n"
        "    left.plot([0, *severities], [clean, *(100 * v for v in mean)], style, marker='o', label=label)\n"
        "    pgd = sorted((pgd_eps(k.removeprefix(prefix)), v) for k, v in results.items()\n"
        "                 if k.startswith(f'{prefix}pgd/'))\n"
        "    right.plot([0, *(255 * eps for eps, _ in pgd)], [clean, *(100 * v for _, v in pgd)], style,\n"
        "               marker='o', label=label)\n"
        "    assert pgd[-1][1] <= results[f'{prefix}clean']  # the attack lowers every curve\n"
        "left.set(xlabel='severity (0 = clean)', ylabel='top-1 accuracy (%)', title='mean over 11 corruptions')\n"
        "right.set(xlabel='PGD-10 L-inf eps (x/255; 0 = clean)', ylabel='top-1 accuracy (%)', title='PGD')\n"
        "for ax in (left, right):\n"
        "    ax.grid(alpha=0.3)\n"
        "    ax.legend(fontsize=8)\n"
        "fig.suptitle('the probe through its own head; its encoder and the floors through one converged logistic '\n"
        "             'regression', fontsize=10)\n"
        "plt.tight_layout()\n"
        "plt.show()\n"
        "assert results['corruption/mean'] <= results['clean'] + 0.02"
    ),
    new_markdown_cell(
        "Read every representation number against its floors: a pre-trained encoder is only worth its "
        "pre-training where it beats the random encoder of the same architecture, and raw pixels are a strong "
        "baseline on Fashion-MNIST. Compare them through the same readout: the figure draws the probe through its "
        "own head (SGD, 1 epoch, short of converged) and its encoder and the floors through one converged "
        "logistic regression, so where the probe's curve lies below a floor but its encoder's logistic-regression "
        "curve does not, the gap is the readout, not the encoder. These numbers come from a 10-step encoder (the "
        "robustness table on 32 test images, its readouts fit on 500 training images): they show the tools, "
        "not the method. The "
        "frozen-feature "
        "numbers are converged and cheap, so they are the ones to compare encoders by; "
        "`benchmarks/study.py` does so for MAE, SimMIM and their AEMIM variants on full Fashion-MNIST."
    ),
]


def notebooks() -> dict[str, nbformat.NotebookNode]:
    """{file name: notebook} as this script writes them, before execution (no outputs)."""
    built = {}
    for name, cells in (("quickstart.ipynb", QUICKSTART), ("evaluate.ipynb", EVALUATE)):
        notebook = new_notebook(cells=copy.deepcopy(cells))
        for index, cell in enumerate(notebook.cells):
            cell.id = f"{Path(name).stem}-{index}"  # stable ids: regenerating changes nothing unless the cells do
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        built[name] = notebook
    return built


def execute(notebook: nbformat.NotebookNode, timeout: int) -> None:
    """Run every cell in order in a fresh kernel, started in notebooks/; outputs and figures are stored in
    ``notebook``. A failing cell raises ``nbclient.exceptions.CellExecutionError``."""
    folder = {"metadata": {"path": NOTEBOOKS}}
    NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False, resources=folder).execute()


def main() -> None:
    parser = argparse.ArgumentParser(description="Write notebooks/*.ipynb from the cell sources in this script.")
    parser.add_argument("--execute", action="store_true", help="run each notebook and keep its outputs and figures")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell when executing")
    args = parser.parse_args()
    for name, notebook in notebooks().items():
        if args.execute:
            execute(notebook, args.timeout)
        nbformat.write(notebook, NOTEBOOKS / name)
        print(f"wrote {NOTEBOOKS / name}")


if __name__ == "__main__":
    main()
