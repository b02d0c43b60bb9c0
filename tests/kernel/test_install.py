"""`codegen-repl install-kernel`, run as a user runs it (the console script, a subprocess);
`jupyter kernelspec list` then shows the kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.numpy import load_file

from codegen_repl.errors import ConfigError
from codegen_repl.kernel.install import KernelInstall, parameter_count
from codegen_repl.model.config import CodeGenConfig

BIN = Path(sys.executable).parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_install_kernel_into_a_prefix_is_listed_by_jupyter(tmp_path, chat_checkpoint) -> None:
    done = run("codegen-repl", "install-kernel", "--prefix", str(tmp_path), "--name", "cg-x",
               "--model", str(chat_checkpoint))  # fmt: skip
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "share" / "jupyter" / "kernels" / "cg-x"
    assert f"installed kernelspec cg-x in {folder}" in done.stdout
    spec = json.loads((folder / "kernel.json").read_text())
    assert spec["argv"][1:3] == ["-m", "codegen_repl.kernel"]
    assert Path(spec["argv"][0]).parent == BIN  # this environment's Python (python or python3)
    assert f"--CodeGenKernel.model={chat_checkpoint}" in spec["argv"]
    # the name says what the folder holds: its size, counted as its weights file counts it
    weights = load_file(chat_checkpoint / "model.safetensors")
    count = sum(tensor.size for tensor in weights.values())
    assert parameter_count(json.loads((chat_checkpoint / "config.json").read_text())) == count
    size = f"{count / 10**6:.1f}M"
    assert spec["display_name"] == f"CodeGen ({chat_checkpoint.name}, {size} parameters)"
    assert (folder / "logo-svg.svg").read_text().startswith("<svg")
    for pixels in (32, 64):  # the names and sizes Jupyter looks for
        with Image.open(folder / f"logo-{pixels}x{pixels}.png") as logo:
            assert (logo.format, logo.size) == ("PNG", (pixels, pixels))
    assert (spec["language"], spec["interrupt_mode"]) == ("codegen", "signal")
    listed = run("jupyter", "kernelspec", "list", "--json",
                 env={"JUPYTER_PATH": str(tmp_path / "share" / "jupyter")})  # fmt: skip
    specs = json.loads(listed.stdout)["kernelspecs"]
    assert Path(specs["cg-x"]["resource_dir"]) == folder


def test_install_kernel_refuses_bad_choices_in_one_line() -> None:
    done = run("codegen-repl", "install-kernel", "--user", "--sys-prefix")
    assert done.returncode == 2 and done.stderr.strip().startswith("error: give at most one")
    done = run("codegen-repl", "install-kernel", "--name", "no spaces", "--prefix", "/tmp")
    assert done.returncode == 2 and "letters, digits" in done.stderr


def test_a_server_kernel_passes_the_url_and_a_relative_folder_becomes_absolute(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    spec = KernelInstall(model="ckpt", server="http://127.0.0.1:9", api_key="k1").spec()
    assert spec["env"] == {"CODEGEN_API_KEY": "k1"}
    assert "env" not in KernelInstall(model="ckpt").spec()
    assert f"--CodeGenKernel.model={tmp_path / 'ckpt'}" in spec["argv"]
    assert "--CodeGenKernel.server=http://127.0.0.1:9" in spec["argv"]
    assert spec["display_name"] == "CodeGen (ckpt on 127.0.0.1:9)"
    with pytest.raises(ConfigError, match="prefix folder"):
        KernelInstall(place="prefix")


def test_install_kernel_refuses_a_model_it_could_not_load(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    for model, says in [
        ("/nope", "is neither a checkpoint folder nor a hub id like 'Salesforce/codegen-350M"),
        ("./nope", "is neither a checkpoint folder nor a hub id"),
        (str(tmp_path / "empty"), "holds no config.json; give the checkpoint's folder"),
    ]:
        done = run("codegen-repl", "install-kernel", "--prefix", str(tmp_path), "--model", model)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"error: {model} {says}") and done.stderr.count("\n") == 1
    assert not (tmp_path / "share").exists()


@pytest.mark.parametrize(
    ("model", "server", "shown"),
    [
        ("Salesforce/codegen-350M-mono", None, "codegen-350M-mono"),
        ("runs/tiny/checkpoint", None, "tiny"),
        ("hub/models--Salesforce--codegen-2B-mono/snapshots/" + "0" * 40, None, "codegen-2B-mono"),
        ("runs/tiny/checkpoint-1000", None, "tiny"),
        (None, "http://127.0.0.1:8000", "server 127.0.0.1:8000"),
        ("codegen-6B-mono", "http://gpu:8000/v1", "codegen-6B-mono on gpu:8000"),
        (None, None, "configured model"),
    ],
)
def test_the_display_name_says_the_model(tmp_path, monkeypatch, model, server, shown) -> None:
    monkeypatch.chdir(tmp_path)
    if model and "/" in model and not model.startswith("Salesforce"):
        (tmp_path / model).mkdir(parents=True)
    assert KernelInstall(model=model, server=server).spec()["display_name"] == f"CodeGen ({shown})"


def test_a_published_shape_is_named_by_its_size(tmp_path) -> None:
    folder = tmp_path / "checkpoint"  # a name that says nothing: the folder above is used
    folder.mkdir()
    config = CodeGenConfig.preset("350M").to_hf_dict()
    (folder / "config.json").write_text(json.dumps(config | {"_name_or_path": "Salesforce/x"}))
    shown = KernelInstall(model=str(folder)).spec()["display_name"]
    assert shown == f"CodeGen ({tmp_path.name} from x, 357M parameters)"
