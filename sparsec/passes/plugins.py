"""Plugins named on the command line (`--plugin MODULE`) or in `SPARSEC_PLUGINS`: importing a
module runs its `@register` decorators, so its passes work in `--pass` and recipes.

A plugin is a module name on the Python path (`my_passes`, `my_pkg.passes`) or the path of a
`.py` file. Importing it executes it: name only modules you trust. Installed packages can
instead publish passes through the `sparsec.passes` entry-point group (loaded always).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from ..errors import BadInputError

__all__ = ["ENV_VAR", "load_plugin", "load_plugins", "load_env_plugins", "LOADED"]

ENV_VAR = "SPARSEC_PLUGINS"
LOADED: dict[str, ModuleType] = {}


def load_plugin(name: str, where: str = "--plugin") -> ModuleType:
    """Import a plugin module by name or .py path (once)."""
    name = name.strip()
    if name in LOADED:
        return LOADED[name]
    try:
        module = _from_path(Path(name)) if name.endswith(".py") else importlib.import_module(name)
    except BadInputError:
        raise
    except Exception as e:
        msg = (str(e).splitlines() or [""])[0]
        raise BadInputError(f"{where} {name}: importing it raised {type(e).__name__}: {msg}; "
                            "put the module on PYTHONPATH or give the path of its .py file"
                            ) from e
    LOADED[name] = module
    return module


def _from_path(path: Path) -> ModuleType:
    if not path.is_file():
        raise BadInputError(f"--plugin {path}: no such file")
    mod_name = f"sparsec_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def load_plugins(names: list[str] | tuple[str, ...], where: str = "--plugin") -> None:
    for name in names:
        if name.strip():
            load_plugin(name, where)


def load_env_plugins() -> None:
    """Import the comma-separated modules of SPARSEC_PLUGINS."""
    load_plugins(os.environ.get(ENV_VAR, "").split(","), where=ENV_VAR)
