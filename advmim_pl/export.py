"""Export the pre-trained clean encoder for use outside this project: a plain timm ViT state dict (one safetensors
file, ``export_encoder``), a timm folder (``export_folder``: weights, ``config.json`` and a model card, loadable with
``timm.create_model("local-dir:FOLDER", pretrained=True)``), or an upload of that folder to the Hugging Face Hub
(``push_encoder``: a private repo unless asked otherwise). ``load_exported`` rebuilds the timm model from the single
file; reading weights back into this project's modules is ``advmim_pl.weights``. The model card is this project's
(``render_card``); only timm's and huggingface_hub's public functions are used.

The clean encoder is psi_e and phi_c in the notation of docs/method.md: the weights both branches share and the
clean branch's own normalisation layers. The auxiliary branch's copies (phi_a) and the decoders are dropped.
"""

import json
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, NamedTuple

import timm
import torch
from huggingface_hub import HfApi
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf

from advmim_pl.models.vit import timm_kwargs
from advmim_pl.sharding import read_any
from advmim_pl.weights import encoder_state_dict, method_name

TASK = "image-feature-extraction"  # the Hub's pipeline tag for an encoder without a classifier head


def model_args(hparams: dict[str, Any]) -> dict[str, Any]:
    """The encoder's architecture arguments (``timm_kwargs`` without the model name): timm's ``model_args``."""
    return {k: v for k, v in timm_kwargs(hparams).items() if k != "model_name"}


def project_metadata(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What this project reads back from an export besides the weights: the create-model arguments, the pixel
    normalisation, the pre-training method's class name (MAE / SimMIM, for the pooling) and the resolution it was
    trained at (``training_resolution``)."""
    hparams = checkpoint["hyper_parameters"]
    return {
        "timm_kwargs": timm_kwargs(hparams),
        "mean": list(hparams["mean"]),
        "std": list(hparams["std"]),
        "method": method_name(hparams),
        "resolution": training_resolution(checkpoint),
    }


def training_resolution(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The side the encoder is exported at, ``final`` (its ``img_size``: the last epochs' side under progressive
    resolution), and the data module's progressive-resolution schedule that led there (``{"class_path",
    "init_args"}``), or None when every epoch trained at ``final``."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    return {"final": checkpoint["hyper_parameters"]["img_size"], "schedule": data.get("resolution")}


def read_pretraining(ckpt_path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``ckpt_path``, checked to be a pre-training one (a ``PretrainModule``'s weights and
    hyperparameters). A missing file is FileNotFoundError, an unreadable one CheckpointError, another kind
    ValueError. A sharded checkpoint folder is read under the trust rule of ``advmim_pl.sharding``."""
    checkpoint = read_any(ckpt_path)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "encoder" not in hparams or "state_dict" not in checkpoint:
        raise ValueError(
            f"checkpoint {str(ckpt_path)!r} is not a pre-training checkpoint (it lacks a PretrainModule's state_dict "
            "and hyper_parameters): export a .ckpt written by advmim fit"
        )
    return checkpoint


def clean_encoder(checkpoint: dict[str, Any]) -> torch.nn.Module:
    """The clean encoder of a pre-training checkpoint as a timm model, whose ``pretrained_cfg`` holds the
    preprocessing it was trained with (mean, std, input size, the evaluation crop)."""
    hparams = checkpoint["hyper_parameters"]
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    preprocessing = {
        "tag": method_name(hparams).lower() + ("_aemim" if with_plugin(hparams) else ""),
        "mean": tuple(hparams["mean"]),
        "std": tuple(hparams["std"]),
        "input_size": (hparams["in_chans"], hparams["img_size"], hparams["img_size"]),
        "num_classes": 0,
        "interpolation": "bicubic",
        "crop_pct": data.get("eval_crop_ratio", 1.0),  # resize to img_size / crop_pct, then centre crop
        "crop_mode": "center",
    }
    model = timm.create_model(**timm_kwargs(hparams), pretrained_cfg_overlay=preprocessing)
    model.load_state_dict(encoder_state_dict(checkpoint["state_dict"]), strict=True)
    return model


def export_encoder(ckpt_path: str | Path, output: str | Path) -> Path:
    """Write the clean encoder of a pre-training checkpoint to ``output`` (safetensors).

    The file loads with ``timm.create_model(**kwargs).load_state_dict(load_file(output))``, strict; the
    create-model arguments, the pixel normalisation (mean, std) and the pre-training method's class name are stored in
    the file's metadata.
    """
    checkpoint = read_pretraining(ckpt_path)
    state = clean_encoder(checkpoint).state_dict()
    # safetensors metadata maps str to str: the lists and dicts as JSON
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in project_metadata(checkpoint).items()}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(output), metadata=metadata)
    return output


def export_folder(ckpt_path: str | Path, folder: str | Path, overwrite: bool = False) -> Path:
    """Write the clean encoder of a pre-training checkpoint as a timm folder, with timm's ``save_for_hf``.

    ``folder`` gets ``model.safetensors`` (the timm state dict), ``config.json`` (timm's: ``architecture``,
    ``model_args``, ``pretrained_cfg`` with mean, std and input size, plus ``advmim``: ``project_metadata``) and
    ``README.md`` (``model_card`` rendered by ``render_card``), so that ``timm.create_model("local-dir:FOLDER",
    pretrained=True)`` alone rebuilds the encoder. A folder that holds anything is FileExistsError unless
    ``overwrite``, which replaces these three files and leaves the rest.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"output {str(folder)!r} is an existing file, not a folder")
    held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise FileExistsError(f"output folder {str(folder)!r} is not empty (it holds {shown})")
    write_folder(read_pretraining(ckpt_path), Path(ckpt_path), folder, f"local-dir:{folder}", folder.name)
    return folder


def write_folder(checkpoint: dict[str, Any], ckpt_path: Path, folder: Path, load_name: str, title: str) -> None:
    """``model.safetensors``, ``config.json`` and ``README.md`` of the checkpoint's clean encoder into ``folder``;
    the card's loading snippet names ``load_name`` and its heading ``title``."""
    hparams = checkpoint["hyper_parameters"]
    model = clean_encoder(checkpoint)
    save_for_hf(
        model,
        str(folder),
        model_config={"advmim": project_metadata(checkpoint)},
        model_args=model_args(hparams),
        safe_serialization=True,
    )
    card = render_card(model_card(checkpoint, ckpt_path, model, load_name), title)
    (folder / "README.md").write_text(card, encoding="utf-8")


class Pushed(NamedTuple):
    """What ``push_encoder`` did: the commit's URL, whether the repo is private, and the branch it went to."""

    url: str
    private: bool
    revision: str | None


def push_encoder(ckpt_path: str | Path, repo_id: str, public: bool = False, revision: str | None = None) -> Pushed:
    """Upload the clean encoder of a pre-training checkpoint to the Hugging Face Hub repo ``repo_id``: the files of
    ``export_folder``, with huggingface_hub's ``HfApi``.

    A missing repo is created private unless ``public``; an existing one keeps its visibility (``Pushed.private``
    says which it has, from ``repo_info``). A ``revision`` branch that does not exist yet is created first (from the
    default branch). The model card is uploaded only where the branch has no README.md yet, so an edited card stays.
    The Hub client's errors (no network, no token) pass through."""
    checkpoint = read_pretraining(ckpt_path)
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=not public, exist_ok=True).repo_id
    private = bool(api.repo_info(repo_id).private)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)  # an upload to a missing branch fails
    keep_card = api.file_exists(repo_id, "README.md", revision=revision)
    load_name = f"hf-hub:{repo_id}" + (f"@{revision}" if revision else "")
    with TemporaryDirectory() as tmp:
        write_folder(checkpoint, Path(ckpt_path), Path(tmp), load_name, repo_id.rpartition("/")[2])
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            revision=revision,
            commit_message=f"Add the clean {method_name(checkpoint['hyper_parameters'])} encoder of "
            f"{Path(ckpt_path).name}",
            ignore_patterns=["README.md"] if keep_card else None,
        )
    return Pushed(str(getattr(commit, "commit_url", commit)), private, revision)


def progressive_note(schedule: dict[str, Any] | None) -> str:
    """The card's note on a progressive-resolution schedule (its class and arguments), or "" without one."""
    if schedule is None:
        return ""
    name = schedule["class_path"].rpartition(".")[2]
    return f"; trained with progressive resolution ({name} {schedule['init_args']}), exported at the final side"


def model_card(checkpoint: dict[str, Any], ckpt_path: Path, model: torch.nn.Module, load_name: str) -> dict[str, Any]:
    """The model card of an exported encoder, as ``render_card`` takes it: the method (and the attack's
    settings when the plug-in was on), the pre-training options, the data, how long it trained, and the
    feature-evaluation table when a ``features.md`` lies beside the checkpoint or in its version folder."""
    hparams = checkpoint["hyper_parameters"]
    method = method_name(hparams) or "masked image modelling"
    plugin = "with the AEMIM adversarial plug-in" if with_plugin(hparams) else "without the adversarial plug-in"
    size, chans = hparams["img_size"], hparams["in_chans"]
    details: dict[str, Any] = {
        "Model type": "Image feature backbone (ViT encoder, no classifier head)",
        "Pre-training": f"{method}, {plugin}",
    }
    if with_plugin(hparams):
        details["Plug-in"] = plugin_settings(checkpoint) or "not recorded in the checkpoint"
    details |= {
        "Params (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "Image size": f"{size} x {size}, {chans} channel{'s' if chans > 1 else ''}, {hparams['patch_size']}-px patches"
        + progressive_note(training_resolution(checkpoint)["schedule"]),
        "Pixel normalisation": f"[0, 1] images, mean {list(hparams['mean'])}, std {list(hparams['std'])}",
        "Data": data_description(checkpoint),
        "Training": training_length(checkpoint),
        "Method options": hparams.get("method", {}).get("init_args", {}),
        "Pre-training options": {
            k: v for k, v in hparams.items() if k not in ("method", "plugin") and not k.startswith("_")
        },
        "Checkpoint": ckpt_path.name,
    }
    card = {
        "tags": [TASK, "timm", "masked-image-modeling"],
        "description": (
            f"The clean encoder of a {method} pre-training run {plugin}, exported by `advmim export`: the weights "
            "both branches share and the clean branch's normalisation layers, without decoders, auxiliary-branch "
            "layers or classifier head."
        ),
        "details": details,
        "usage": usage(load_name, chans),
    }
    table = features_table(ckpt_path)
    if table:
        card["comparison"] = table
    return card


def render_card(card: dict[str, Any], title: str) -> str:
    """The README.md text of ``card`` (``model_card``'s keys: ``tags``, ``description``, ``details``, ``usage`` and
    the optional ``comparison``) under the heading ``Model card for {title}``: a YAML header with the tags, the
    Hub's ``pipeline_tag`` and ``library_name: timm`` (no licence: the owner of the weights chooses one), then one
    section each. A details value that is a dict or list becomes a nested list."""
    lines = ["---", "tags:", *(f"- {tag}" for tag in card.get("tags", [])), f"pipeline_tag: {TASK}"]
    lines += ["library_name: timm", "---", f"# Model card for {title}"]
    if "description" in card:
        lines += ["", card["description"]]
    if "details" in card:
        lines += ["", "## Model Details"]
        for key, value in card["details"].items():
            if isinstance(value, dict):
                lines += [f"- **{key}:**", *(f"  - {k}: {v}" for k, v in value.items())]
            elif isinstance(value, (list, tuple)):
                lines += [f"- **{key}:**", *(f"  - {v}" for v in value)]
            else:
                lines.append(f"- **{key}:** {value}")
    for section, key in (("Model Usage", "usage"), ("Model Comparison", "comparison")):
        if key in card:
            lines += ["", f"## {section}", card[key]]
    return "\n".join(lines) + "\n"


def with_plugin(hparams: dict[str, Any]) -> bool:
    """Whether the run had the AEMIM plug-in (``plugin`` in its hyperparameters; ``adversarial`` before the plug-in
    became one block)."""
    return bool(hparams.get("plugin") or hparams.get("adversarial"))


def plugin_settings(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The plug-in's settings: its hyperparameters, or for checkpoints written before the plug-in became one block, the
    attack's settings saved by ``AdversarialTargetCallback`` (its state is the one with ``settings``)."""
    plugin = checkpoint["hyper_parameters"].get("plugin")
    if plugin:
        return plugin["init_args"]
    for state in checkpoint.get("callbacks", {}).values():
        if isinstance(state, dict) and "settings" in state:
            return state["settings"]
    return None


def data_description(checkpoint: dict[str, Any]) -> dict[str, Any] | str:
    """The data module's class path and options, as Lightning saved them in the checkpoint."""
    data = checkpoint.get("datamodule_hyper_parameters")
    if not data:
        return "not recorded in the checkpoint"
    options = {k: v for k, v in data.items() if not k.startswith("_")}
    return {"module": data["_class_path"], **options} if "_class_path" in data else options


def training_length(checkpoint: dict[str, Any]) -> str:
    """The epoch and optimizer step the checkpoint was saved at."""
    if "epoch" not in checkpoint or "global_step" not in checkpoint:
        return "not recorded in the checkpoint"
    return f"{checkpoint['global_step']:,} optimizer steps (saved at epoch index {checkpoint['epoch']}, counted from 0)"


def features_table(ckpt_path: Path) -> str | None:
    """The ``features.md`` (``advmim test -c eval/features.yaml``) beside the checkpoint or in its version folder."""
    for folder in (ckpt_path.parent, ckpt_path.parent.parent):
        if (folder / "features.md").is_file():
            return (folder / "features.md").read_text(encoding="utf-8").strip()
    return None


def usage(load_name: str, in_chans: int) -> str:
    """The model card's loading snippet for ``load_name`` (``local-dir:...`` or ``hf-hub:...``)."""
    image = "a PIL image" + (" in mode 'L' (grey)" if in_chans == 1 else " in mode 'RGB'")
    return (
        "```python\n"
        "import timm\n\n"
        f'model = timm.create_model("{load_name}", pretrained=True).eval()\n'
        "transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))\n"
        f"tokens = model.forward_features(transform(image).unsqueeze(0))  # image: {image}\n"
        "```"
    )


def load_exported(path: str | Path) -> torch.nn.Module:
    """Rebuild the timm ViT from an exported file (expects [0, 1] images normalised with its mean/std)."""
    with safe_open(str(path), "pt") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
    model = timm.create_model(**kwargs)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model
