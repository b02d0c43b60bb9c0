"""The `codegen` kernelspec: written to a temp folder, installed by jupyter_client's
KernelSpecManager (so `jupyter kernelspec list` and every frontend find it).

The folder holds `kernel.json` and the logo files Jupyter looks for by name (`logo-svg.svg`,
`logo-32x32.png`, `logo-64x64.png`: the kernelspec format, jupyter_client's "Kernel specs"
documentation); the display name says which model the kernel runs and how big it is.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from codegen_repl.core.settings import HUB_ID
from codegen_repl.errors import ConfigError

DEFAULT_NAME = "codegen"
_NAME = re.compile(r"^[a-z0-9._-]+$", re.IGNORECASE)  # what jupyter_client accepts
PLACES = ("user", "sys-prefix", "prefix")
_HUB_CACHE = re.compile(r"models--[\w.-]+?--([\w.-]+)")  # the HF cache's folder of a repo
# Folder names that say nothing about the model: look at the folder above instead.
_GENERIC = re.compile(
    r"(checkpoints?|exports?|exported|hf|model|final|latest|best|snapshots|[0-9a-f]{40}"
    r"|(step|checkpoint|ckpt)?[-_]?\d+)",
    re.IGNORECASE,
)


@dataclasses.dataclass(frozen=True)
class KernelInstall:
    """Where and how to install the kernelspec.

    Args:
        name: the kernelspec's name (`jupyter kernelspec list` shows it).
        place: "user" (~/.local/share/jupyter), "sys-prefix" (this Python's environment) or
            "prefix" (under `prefix`/share/jupyter).
        prefix: the folder for place "prefix".
        model: checkpoint folder or hub id the kernel loads (a folder is made absolute).
        server: decoder server URL (then `model` names the served model).
        api_key: the server's key, put in the kernel's environment as CODEGEN_API_KEY (the
            kernelspec file then holds it: keep it private).
        display_name: the name frontends show; default from the model.
    """

    name: str = DEFAULT_NAME
    place: str = "user"
    prefix: Path | None = None
    model: str | None = None
    server: str | None = None
    api_key: str | None = None
    display_name: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError(f"kernel name {self.name!r} may hold only letters, digits, "
                              "'.', '_' and '-'")  # fmt: skip
        if self.place not in PLACES:
            raise ConfigError(f"place must be one of {', '.join(PLACES)}, got {self.place!r}")
        if (self.place == "prefix") != (self.prefix is not None):
            raise ConfigError("give a prefix folder exactly when installing with --prefix")

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "codegen_repl.kernel", "-f", "{connection_file}"]
        if self.model:
            argv.append(f"--CodeGenKernel.model={_model_argument(self.model)}")
        if self.server:
            argv.append(f"--CodeGenKernel.server={self.server}")
        return argv

    def spec(self) -> dict[str, Any]:
        spec = {
            "argv": self.argv(),
            "display_name": self.display_name
            or f"CodeGen ({shown_model(self.model, self.server)})",
            "language": "codegen",
            "interrupt_mode": "signal",
            "metadata": {"debugger": False},
        }
        if self.api_key:
            spec["env"] = {"CODEGEN_API_KEY": self.api_key}
        return spec


def shown_model(model: str | None, server: str | None) -> str:
    """What the kernel's display name says it runs: `codegen-350M-mono`, `server host:port`,
    `codegen-350M-mono on host:port`."""
    name = _model_name(model) if model else None
    if server:
        where = urllib.parse.urlsplit(server).netloc or server
        return f"{name} on {where}" if name else f"server {where}"
    return name or "configured model"


def _model_name(model: str) -> str:
    """The model's name, and for a checkpoint folder its size from its config.json (a folder's
    name alone may say nothing of what it holds)."""
    name = _folder_name(model)
    config = Path(model).expanduser() / "config.json"
    try:
        hf = json.loads(config.read_text())
        size = _rounded(parameter_count(hf))
    except (OSError, ValueError, KeyError, TypeError):
        return name
    origin = hf.get("_name_or_path")
    if isinstance(origin, str) and HUB_ID.match(origin) and origin.split("/")[1] != name:
        name = f"{name} from {origin.split('/')[1]}"
    return f"{name}, {size} parameters"


def parameter_count(hf: dict[str, Any]) -> int:
    """The parameter count of a CodeGen model from its HF config.json (as transformers'
    CodeGenForCausalLM has them).

    Raises:
        KeyError, TypeError, ValueError: the config lacks n_layer, n_embd or vocab_size, or they
            are not numbers.
    """
    layers, width, vocab = int(hf["n_layer"]), int(hf["n_embd"]), int(hf["vocab_size"])
    inner = int(hf.get("n_inner") or 4 * width)
    # per layer: LayerNorm, fused qkv and out projections (no bias), the MLP (with biases)
    layer = 2 * width + 4 * width * width + 2 * width * inner + inner + width
    return layers * layer + 2 * width + 2 * vocab * width + vocab  # final norm, wte, lm_head


def _rounded(count: int) -> str:
    """357M, 2.8B, 0.3M."""
    if count >= 10**9:
        return f"{count / 10**9:.1f}B"
    return f"{count / 10**6:.0f}M" if count >= 10**8 else f"{count / 10**6:.1f}M"


def _folder_name(model: str) -> str:
    """A model's name: a hub id's repository, or the folder's name, skipping the folder names
    that do not say which model (`checkpoint`, `export`, step numbers, hub snapshot hashes)."""
    path = Path(model).expanduser()
    if not path.exists() and HUB_ID.match(model):
        return model.split("/")[1]
    for part in reversed(path.resolve().parts):
        hub_cache = _HUB_CACHE.fullmatch(part)
        if hub_cache:
            return hub_cache.group(1)
        if not _GENERIC.fullmatch(part):
            return part
    return model


def _model_argument(model: str) -> str:
    """A local folder as an absolute path (the kernel starts in the notebook's folder)."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def install_kernel(options: KernelInstall) -> Path:
    """Install the kernelspec; returns its folder."""
    from jupyter_client.kernelspec import KernelSpecManager

    prefix = None
    if options.place == "sys-prefix":
        prefix = sys.prefix
    elif options.prefix is not None:
        prefix = str(options.prefix.expanduser().resolve())
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "kernel.json").write_text(json.dumps(options.spec(), indent=1) + "\n")
        write_logos(Path(folder))
        try:
            installed = KernelSpecManager().install_kernel_spec(
                folder, kernel_name=options.name, user=options.place == "user", prefix=prefix
            )
        except OSError as error:
            raise ConfigError(
                f"could not install the kernelspec: {error}; pick a place you can write to "
                "(--user, --sys-prefix or --prefix FOLDER)"
            ) from error
    return Path(installed)


_LOGO_SVG = """<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 64">
<rect width="64" height="64" rx="12" fill="#1f4e79"/>
<text x="32" y="42" font-family="monospace" font-size="26" font-weight="bold" fill="#ffffff"
 text-anchor="middle">&lt;/&gt;</text>
</svg>
"""


def write_logos(folder: Path) -> None:
    """The kernel's logo in `folder`: an SVG (JupyterLab's launcher) and 32 and 64 pixel PNGs
    (drawn with Pillow, the imaging library that textual-image and matplotlib bring)."""
    from PIL import Image, ImageDraw, ImageFont

    (folder / "logo-svg.svg").write_text(_LOGO_SVG)
    for size in (32, 64):
        image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        draw.rounded_rectangle((0, 0, size - 1, size - 1), radius=size // 5, fill="#1f4e79")
        font = ImageFont.load_default(size=size * 2 // 5)
        draw.text((size / 2, size / 2), "</>", fill="#ffffff", font=font, anchor="mm")
        image.save(folder / f"logo-{size}x{size}.png")
