"""Per-tensor digests of the weights a micro MIM + AEMIM fit of a few steps ends with.

A refactoring that must not change what training computes runs this before and after, on the same machine:

    OMP_NUM_THREADS=1 PYTHONPATH=<checkout> python tests/helpers/fit_digest.py OUT.json   # writes the digests
    OMP_NUM_THREADS=1 PYTHONPATH=<checkout> python tests/helpers/fit_digest.py OUT.json --compare BEFORE.json

Each case is a seeded 3-step CPU fit (fp32, one thread) of the micro ViT on fixed smooth images. The plug-in is built
through whichever constructor the checkout has: attack settings flattened into ``AEMIM(**settings)``, or nested as
``AEMIM(attack=Attacker(**settings))``; the auxiliary target's normalisation goes to the plug-in or to MAE, whichever
takes it. Only ``advmim_pl`` is imported, so the script runs against any checkout.
"""

import argparse
import hashlib
import inspect
import json
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from advmim_pl.adversarial import AEMIM, Attacker
from advmim_pl.mim import MAE, MaskFeat, SimMIM
from advmim_pl.modules import PretrainModule

MICRO = dict(
    encoder="vit_base_patch16_224",
    img_size=32,
    patch_size=4,
    in_chans=1,
    mean=(0.5,),
    std=(0.25,),
    encoder_kwargs=dict(depth=2, embed_dim=64, num_heads=4),
    batch_size=8,
    base_lr=1e-2,
    warmup_epochs=0,
)
METHODS = {
    "mae": lambda **options: MAE(decoder_dim=32, decoder_depth=1, decoder_heads=4, **options),
    "simmim": lambda **options: SimMIM(mask_patch_size=8, **options),
    "maskfeat": lambda **options: MaskFeat(mask_patch_size=8, cell_size=2, **options),
}
# name: (method, attack settings, plug-in settings)
CASES = {
    "mae": ("mae", {}, {}),
    "mae_variant": (
        "mae",
        {"eps": 8 / 255, "steps": 2, "warmup_epochs": 0.5},
        {"aux_target_norm": "clean", "attack_mask": "complement", "distance": "cosine", "batch_fraction": 0.5},
    ),
    "mae_shared": ("mae", {"perturbation": "sign"}, {"aux_decoder": "shared", "branch_params": "none"}),
    "simmim": ("simmim", {}, {}),
    "maskfeat": ("maskfeat", {}, {}),
}


def plugin(attack: dict, options: dict) -> AEMIM:
    """The plug-in with these settings, through the constructor this checkout has."""
    parameters = inspect.signature(AEMIM.__init__).parameters
    options = {k: v for k, v in options.items() if k in parameters}
    if parameters["attack"].kind is inspect.Parameter.VAR_KEYWORD:
        return AEMIM(**options, **attack)
    return AEMIM(attack=Attacker(**attack), **options)


def host(method: str, options: dict):
    """The host with those of ``options`` its constructor takes (the plug-in's options that moved to the host)."""
    make = METHODS[method]
    parameters = inspect.signature(type(make()).__init__).parameters
    return make(**{k: v for k, v in options.items() if k in parameters})


def images(n: int = 24, seed: int = 0) -> torch.Tensor:
    """(n, 1, 32, 32) smooth random images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)


def fit(case: str, steps: int = 3) -> dict[str, str]:
    """{state_dict key: sha256 of the tensor's bytes} after ``steps`` optimizer steps of ``case``."""
    method, attack, options = CASES[case]
    L.seed_everything(0, verbose=False)
    method = host(method, options)
    module = PretrainModule(method=method, plugin=plugin(attack, options), **MICRO)
    x = images()
    data = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=8, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu",
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        max_steps=steps,
    )
    trainer.fit(module, data)
    return {
        key: hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        for key, value in module.state_dict().items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file the digests are written to")
    parser.add_argument("--compare", help="digests of an earlier run: exit 1 unless every tensor is bit-identical")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    args = parser.parse_args()
    torch.set_num_threads(1)
    digests = {case: fit(case) for case in args.cases.split(",")}
    with open(args.out, "w") as f:
        json.dump(digests, f, indent=1, sort_keys=True)
    if not args.compare:
        return 0
    with open(args.compare) as f:
        before = json.load(f)
    failed = False
    for case, now in digests.items():
        then = before[case]
        differ = sorted(k for k in then.keys() & now.keys() if then[k] != now[k])
        renamed = sorted(then.keys() ^ now.keys())
        ok = not differ and not renamed
        failed |= not ok
        print(f"{case}: {len(now)} tensors, {'bit-identical' if ok else 'DIFFER'}", *differ[:5], *renamed[:5])
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
