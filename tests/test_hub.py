"""The Hugging Face Hub, without a network: ``advmim export --push-to-hub`` makes a private repo unless --public,
pushes to a --revision branch it creates first, leaves an existing repo's visibility as it is and says so; and the
project imports no private name of timm or huggingface_hub.

``FakeHub`` stands in for ``huggingface_hub.HfApi``: repos with their visibility, branches and files, where an upload
to a branch that does not exist fails, as on the Hub."""

import ast
import fnmatch
from pathlib import Path
from types import SimpleNamespace

import pytest

import advmim_pl.export
from advmim_pl.cli import run
from tests.helpers.micro import micro_module, save

REPO = "someone/advmim-micro"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the commit the fake Hub reports


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
