"""User code named in a config: "path/to/file.py:name" or "package.module:name" (reward functions, gold rules,
environments). A leaf module: the reward actor, the rollout actors and the driver all load user code here.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from rlhf_loop.common.errors import UserError


def is_code_reference(reference: str | None) -> bool:
    """Whether `reference` has the shape "location:attribute" (the attribute an identifier)."""
    if reference is None or ":" not in reference:
        return False
    location, _, attribute = reference.rpartition(":")
    return bool(location) and attribute.isidentifier()


def absolute_reference(reference: str | None) -> str | None:
    """A "file.py:name" reference with the file's path made absolute (a relative one means the driver's working
    directory, wherever the actor that loads it runs); module references and None stay as they are."""
    if reference is None:
        return None
    location, _, attribute = reference.rpartition(":")
    return f"{Path(location).expanduser().resolve()}:{attribute}" if location.endswith(".py") else reference


def load_code_reference(reference: str, key: str) -> Any:
    """The object named by "path/to/file.py:name" or "package.module:name"; `key` is the config key, for errors.

    The last ":" splits off the attribute; a location ending in .py is a file, anything else a module on sys.path.
    """
    location, _, attribute = reference.rpartition(":")
    try:
        module = _import_file(Path(location), key) if location.endswith(".py") else importlib.import_module(location)
    except UserError:
        raise
    except Exception as e:  # whatever the user's module raises while importing
        raise UserError(f"{key} {reference!r}: importing {location} failed: {type(e).__name__}: {e}") from None
    if not hasattr(module, attribute):
        raise UserError(f"{key} {reference!r}: {location} defines no {attribute!r}")
    return getattr(module, attribute)


def _import_file(path: Path, key: str):
    path = path.expanduser().resolve()
    if not path.is_file():
        raise UserError(f"{key}: file {path} does not exist; fix the path in the config")
    # A name unique to the file, so two users' reward.py files never shadow each other in sys.modules.
    name = f"rlhf_loop_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
