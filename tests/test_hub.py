"""The Hugging Face Hub, without a network: ``advmim export --push-to-hub`` makes a private repo unless --public,
pushes to a --revision branch it creates first, leaves an existing repo's visibility as it is and says so; the name
the pushed model card gives loads as ``init_from``; a timm tag without network fails within seconds in one line; and
the project imports no private name of timm or huggingface_hub.

``FakeHub`` stands in for ``huggingface_hub.HfApi``: repos with their visibility, branches and files, where an upload
to a branch that does not exist fails, as on the Hub."""

import ast
import fnmatch
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import constants

import advmim_pl.export
from advmim_pl.cli import run
from advmim_pl.modules import LinearProbeModule
from advmim_pl.reliability import UnsafeCheckpointError
from advmim_pl.weights import read_weights
from tests.helpers.micro import ENCODER, micro_module, save

REPO = "someone/advmim-micro"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the commit hash the fake cache files its snapshot under


class FakeHub:
    """The part of ``HfApi`` that ``push_encoder`` uses, in memory; ``calls`` lists (method, repo, detail) in order."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "branches": {name: {file name: bytes}}}
        self.calls: list[tuple[str, str, object]] = []

    def add(self, repo_id: str, private: bool, files: dict[str, bytes] | None = None) -> None:
        self.repos[repo_id] = {"private": private, "branches": {"main": dict(files or {})}}

    def create_repo(self, repo_id: str, private: bool = False, exist_ok: bool = False, **_) -> SimpleNamespace:
        self.calls.append(("create_repo", repo_id, private))
        if repo_id in self.repos and not exist_ok:
            raise FileExistsError(repo_id)
        if repo_id not in self.repos:
            self.add(repo_id, private)
        return SimpleNamespace(repo_id=repo_id)

    def repo_info(self, repo_id: str, **_) -> SimpleNamespace:
        self.calls.append(("repo_info", repo_id, None))
        return SimpleNamespace(private=self.repos[repo_id]["private"])

    def create_branch(self, repo_id: str, branch: str, exist_ok: bool = False, **_) -> None:
        self.calls.append(("create_branch", repo_id, branch))
        branches = self.repos[repo_id]["branches"]
        if branch in branches and not exist_ok:
            raise FileExistsError(branch)
        branches.setdefault(branch, dict(branches["main"]))

    def file_exists(self, repo_id: str, filename: str, revision: str | None = None, **_) -> bool:
        return filename in self.repos[repo_id]["branches"].get(revision or "main", {})

    def upload_folder(self, repo_id: str, folder_path: str, revision=None, ignore_patterns=None, **_) -> str:
        self.calls.append(("upload_folder", repo_id, revision))
        branch = self.repos[repo_id]["branches"].get(revision or "main")
        if branch is None:
            raise ValueError(f"Invalid rev id: {revision}")  # the Hub refuses an upload to a missing branch
        for path in Path(folder_path).iterdir():
            if not any(fnmatch.fnmatch(path.name, pattern) for pattern in ignore_patterns or []):
                branch[path.name] = path.read_bytes()
        return f"https://huggingface.co/{repo_id}/commit/{COMMIT}"


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(advmim_pl.export, "HfApi", lambda *args, **kwargs: fake)
    return fake


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """An untrained micro MAE, saved as a pre-training checkpoint."""
    return save(micro_module(), tmp_path_factory.mktemp("run") / "last.ckpt")


def push(ckpt: str, out: Path, capsys, *flags: str) -> list[str]:
    """``advmim export CKPT OUT --push-to-hub REPO FLAGS``; the lines it printed."""
    capsys.readouterr()
    run(["export", ckpt, str(out), "--push-to-hub", REPO, *flags])
    return capsys.readouterr().out.strip().splitlines()


# ---- publishing -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("public", [False, True])
def test_a_new_repo_is_private_unless_public_and_holds_the_folders_files(hub, ckpt, tmp_path, capsys, public):
    lines = push(ckpt, tmp_path / "encoder", capsys, *(["--public"] if public else []))

    assert [c for c in hub.calls if c[0] == "create_repo"] == [("create_repo", REPO, not public)]
    assert hub.repos[REPO]["private"] is (not public)
    visibility = "public" if public else "private"
    assert lines[-1] == f"pushed to the {visibility} repo: https://huggingface.co/{REPO}/commit/{COMMIT}"
    assert not any("already exists" in line for line in lines)
    files = hub.repos[REPO]["branches"]["main"]
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    for name in ("model.safetensors", "config.json"):  # the same bytes as the folder written beside
        assert files[name] == (tmp_path / "encoder" / name).read_bytes(), name
    assert f'timm.create_model("hf-hub:{REPO}", pretrained=True)' in files["README.md"].decode()
    assert f"# Model card for {REPO.split('/')[1]}\n" in files["README.md"].decode()


def test_a_revision_branch_is_created_before_the_upload(hub, ckpt, tmp_path, capsys):
    lines = push(ckpt, tmp_path / "encoder", capsys, "--revision", "v2")
    order = [c[0] for c in hub.calls]
    assert ("create_branch", REPO, "v2") in hub.calls
    assert order.index("create_branch") < order.index("upload_folder")
    assert ("upload_folder", REPO, "v2") in hub.calls
    assert hub.repos[REPO]["branches"]["main"] == {}  # nothing on the default branch
    card = hub.repos[REPO]["branches"]["v2"]["README.md"].decode()
    assert f'timm.create_model("hf-hub:{REPO}@v2", pretrained=True)' in card
    assert lines[-1].startswith("pushed to branch 'v2' of the private repo: ")

    push(ckpt, tmp_path / "again", capsys, "--revision", "v2")  # an existing branch is reused, not an error
    assert [c for c in hub.calls if c[0] == "upload_folder"] == [("upload_folder", REPO, "v2")] * 2


@pytest.mark.parametrize("private, flags", [(False, []), (True, ["--public"])])
def test_an_existing_repo_keeps_its_visibility_and_says_so_in_one_line(hub, ckpt, tmp_path, capsys, private, flags):
    hub.add(REPO, private=private, files={"README.md": b"the owner's own card"})
    lines = push(ckpt, tmp_path / "encoder", capsys, *flags)

    kept = "private" if private else "public"
    assert hub.repos[REPO]["private"] is private
    said = [line for line in lines if "already exists" in line]
    assert said == [
        f"the Hub repo '{REPO}' already exists and is {kept}: it stays {kept} (a push never changes a repo's "
        "visibility; change it in the repo's settings)"
    ]
    assert lines[-1].startswith(f"pushed to the {kept} repo: ")
    files = hub.repos[REPO]["branches"]["main"]
    assert files["README.md"] == b"the owner's own card"  # an existing card is not replaced
    assert files["model.safetensors"] == (tmp_path / "encoder" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("flags", [["--public"], ["--revision", "v2"]])
def test_public_or_revision_without_a_push_is_refused(hub, ckpt, tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as exit_info:
        run(["export", ckpt, str(tmp_path / "encoder"), *flags])
    assert exit_info.value.code == 2
    assert f"{flags[0]} applies to a push: add --push-to-hub REPO_ID" in capsys.readouterr().err
    assert hub.calls == [] and not (tmp_path / "encoder").exists()


# ---- reading from the Hub -------------------------------------------------------------------------------------------
def fill_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Put ``files`` into a Hugging Face cache at ``cache`` as a download of ``repo_id``'s main branch leaves them."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def test_the_name_the_pushed_card_gives_loads_as_init_from(hub, ckpt, tmp_path, capsys, monkeypatch):
    push(ckpt, tmp_path / "encoder", capsys)
    files = hub.repos[REPO]["branches"]["main"]
    name = re.search(r'timm\.create_model\("([^"]+)", pretrained=True\)', files["README.md"].decode()).group(1)
    assert name == f"hf-hub:{REPO}"
    fill_cache(tmp_path / "hub", REPO, files)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub's import, and still respected

    weights = read_weights(name)
    assert weights.method == "MAE" and weights.mean == ENCODER["mean"] and weights.std == ENCODER["std"]
    assert set(read_weights(f"timm:{name}").encoder) == set(weights.encoder)
    from_hub, from_ckpt = (LinearProbeModule(10, **ENCODER, init_from=s) for s in (name, ckpt))
    reference = from_ckpt.encoder.vit.state_dict()
    for key, value in from_hub.encoder.vit.state_dict().items():
        assert torch.equal(value, reference[key]), key
    torch.manual_seed(1)
    fresh = LinearProbeModule(10, **ENCODER).encoder.vit.state_dict()  # what the weights replaced
    assert not torch.equal(fresh["blocks.0.attn.qkv.weight"], reference["blocks.0.attn.qkv.weight"])


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TAG = "timm:vit_tiny_patch16_224.augreg_in21k"
FETCH = f"""
import time
from advmim_pl.weights import read_weights
start = time.monotonic()
try:
    read_weights({TAG!r})
except ValueError as err:
    print(f"{{time.monotonic() - start:.2f}}")
    print(err)
"""


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "closed-endpoint"])
def test_a_timm_tag_without_network_fails_within_seconds_in_one_line(tmp_path, offline):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    env |= {"HF_HUB_OFFLINE": "1"} if offline else {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    done = subprocess.run([sys.executable, "-c", FETCH], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    elapsed, *message = done.stdout.strip().splitlines()
    assert len(message) == 1, done.stdout  # one line
    assert float(elapsed) < 15, elapsed  # measured: about 0.1 s offline, 0.2 s against the closed port
    why = "HF_HUB_OFFLINE is set" if offline else "the Hub at http://127.0.0.1:"
    assert message[0].startswith(f"init_from '{TAG}' could not be fetched through timm's hub ({why}")
    assert f"and the local cache {tmp_path / 'hf' / 'hub'} does not hold it); " in message[0]
    assert message[0].endswith("pass the local file or local-dir: folder")
    assert "Retrying" not in done.stderr  # huggingface_hub's backoff never started


# ---- public functions only ----------------------------------------------------------------------------------------
def test_the_project_imports_no_private_name_of_timm_or_huggingface_hub():
    private = []
    for path in sorted(Path(advmim_pl.export.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("timm", "huggingface_hub"):
                names = [*node.module.split("."), *(alias.name for alias in node.names)]
                private += [f"{path.name}: from {node.module} import ..." for n in names if n.startswith("_")][:1]
            elif isinstance(node, ast.Import):
                private += [f"{path.name}: import {a.name}" for a in node.names if "._" in a.name and "timm" in a.name]
    assert private == []
    assert "generate_readme" not in Path(advmim_pl.export.__file__).read_text()


class RunsCode:
    """Unpickling this object creates ``marker``: what a malicious pickle would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_local_dir_folder_is_read_by_timm_weights_only(ckpt, tmp_path):
    folder = tmp_path / "encoder"
    run(["export", ckpt, str(folder)])
    weights = read_weights(f"local-dir:{folder}")
    assert weights.made_by.startswith("architecture='vit_base_patch16_224', model_args={")
    state = weights.encoder
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "code_ran"
    torch.save({**state, "payload": RunsCode(marker)}, folder / "pytorch_model.bin")  # timm's other weights name
    with pytest.raises(UnsafeCheckpointError, match=r"init_from '.*encoder' holds .*refused") as err:
        read_weights(str(folder))
    assert "\n" not in str(err.value) and not marker.exists()
