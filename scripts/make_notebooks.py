"""Write the notebooks under notebooks/ from the cell sources below (run: python scripts/make_notebooks.py)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

QUICKSTART = [
    new_markdown_cell(
        "# advmim_pl quickstart: what the AEMIM plug-in feeds the auxiliary branch\n\n"
        "Pre-train a small ViT with MAE + AEMIM on the bundled Fashion-MNIST sample for one epoch "
        "(about a minute on a laptop CPU), or load a checkpoint of your own by setting `CHECKPOINT`. "
        "Then look at one batch: the clean image, what the encoder sees, the reconstruction, the "
        "adversarial example and its perturbation (amplified), next to a Gaussian perturbation of the "
        "same L-inf size."
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
        "            '--trainer.enable_progress_bar', 'false', '--data.init_args.num_workers', '0'])\n"
        "module, data = cli.model, cli.datamodule\n"
        "if CHECKPOINT:\n"
        "    module = PretrainModule.load_from_checkpoint(CHECKPOINT, method=module.method)\n"
        "attack = cli.trainer.callbacks[[type(c).__name__ for c in cli.trainer.callbacks].index("
        "'AdversarialTargetCallback')]\n"
        "module.attack = attack\n"
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
        "gaussian, _ = perturb('gaussian', objective, x, attack.eps, 0, generator=torch.Generator().manual_seed(0))\n"
        "with torch.no_grad():\n"
        "    distance = {name: objective(image).mean().item()\n"
        "                for name, image in [('clean', x), ('PGD', adversarial), ('Gaussian', gaussian)]}\n"
        "print('feature distance to the clean encoding (the objective the attack maximises):')\n"
        "for name, value in distance.items():\n"
        "    print(f'  {name:9s} {value:.5f}')\n"
        "for name, image in [('PGD', adversarial), ('Gaussian', gaussian)]:\n"
        "    print(f'L-inf size of {name}: {(image - x).abs().max().item():.4f}')\n"
        "assert distance['PGD'] > distance['Gaussian']"
    ),
    new_code_cell(
        "def amplified(delta):\n"
        "    return 0.5 + 0.5 * delta / delta.abs().max().clamp_min(1e-12)\n\n"
        "pixel_mask = upsample_mask(mask.patches, encoder.grid_size, encoder.patch_size)\n"
        "rows = {\n"
        "    'clean': x, 'masked': x * (1 - pixel_mask), 'reconstruction': reconstruction,\n"
        "    'adversarial': adversarial, 'PGD perturbation (amplified)': amplified(adversarial - x),\n"
        "    'Gaussian, same eps': gaussian, 'Gaussian noise (amplified)': amplified(gaussian - x),\n"
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
        "With the default `attack_mask: same`, MAE's masked patches get no gradient, so the PGD "
        "perturbation lives on the visible patches (outside them only the random start remains). "
        "The Gaussian control spreads the same L-inf budget everywhere and moves the features much less."
    ),
]


def write(name: str, cells: list) -> None:
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = Path(__file__).parents[1] / "notebooks" / name
    nbformat.write(notebook, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    write("quickstart.ipynb", QUICKSTART)
