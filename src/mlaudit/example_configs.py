"""The example configs and bring-your-own scripts that ship inside the package (``mlaudit/examples/``;
in a source checkout ``examples/`` points at the same folder), so a pip user has them too.

    mlaudit examples                  # list them
    mlaudit examples --copy my-dir    # copy every example (YAML configs and byo/ scripts) into my-dir
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from .errors import ConfigError


def examples_root() -> Path:
    """Folder of the packaged examples."""
    return Path(str(resources.files("mlaudit") / "examples"))


def list_examples() -> list[str]:
    """Relative paths of every example: ``*.yaml`` configs, then ``byo/*.py`` scripts."""
    root = examples_root()
    return [p.name for p in sorted(root.glob("*.yaml"))] + [f"byo/{p.name}" for p in sorted((root / "byo").glob("*.py"))]


def copy_examples(dest: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Copy every example into ``dest`` (created if missing); refuses to overwrite existing files unless
    ``overwrite``, checking all of them before copying any."""
    out = Path(dest)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--copy {str(out)!r} is a file; give a folder")
    names = list_examples()
    clash = [n for n in names if (out / n).exists()]
    if clash and not overwrite:
        raise ConfigError(f"{str(out)!r} already holds {', '.join(clash[:5])}{' ...' if len(clash) > 5 else ''}; "
                          "choose an empty folder or pass --overwrite")
    written = []
    for n in names:
        target = out / n
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(examples_root() / n, target)
        written.append(target)
    return written
