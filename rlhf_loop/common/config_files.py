"""Reading typed configs from YAML files: layered files, `key=value` overrides, and one-line errors.

A leaf module (it imports nothing of ours but `rlhf_loop.common.errors`), so the reward server can read its config file
without importing the run config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlhf_loop.common.errors import ConfigError


def structured_config(schema: type, layers: Sequence, overrides: Sequence[str], path: Path,
                      problems: Callable[[Any], list[str]], reference: str = "the config reference in README.md"):
    """`layers`, then `key=value` overrides, merged over `schema`'s defaults, built and checked by `problems`.

    Every failure is one ConfigError line naming the file or the override, and the key; `reference` is where the
    valid keys are documented. Shared by the run config and the reward server's config."""
    merged = OmegaConf.structured(schema)
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: {describe_config_error(e, reference)}") from None
    for override in overrides:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {override!r}: {describe_config_error(e, reference)}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {describe_config_error(e, reference)}") from None
    found = problems(cfg)
    if found:
        raise ConfigError(f"{path}: {found[0]}")
    return cfg


def yaml_layers(path: Path, seen: tuple[Path, ...] = ()) -> list:
    """The YAML file and, first, the files it builds on: a top-level `base: other.yaml` (relative to the file)."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' files include each other in a cycle")
    try:
        layer = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors
        raise ConfigError(f"{path}: cannot parse YAML: {str(e).splitlines()[0]}") from None
    base = layer.pop("base", None) if isinstance(layer, DictConfig) else None
    if base is None:
        return [layer]
    base_path = path.parent / str(base)
    if not base_path.is_file():
        raise ConfigError(f"{path}: base file {base_path} does not exist")
    return yaml_layers(base_path, seen + (path.resolve(),)) + [layer]


def describe_config_error(error: OmegaConfBaseException, reference: str = "the config reference in README.md") -> str:
    """One line for an OmegaConf error: the full key and what is wrong with it."""
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0]
    if type(error).__name__ == "ConfigKeyError" and key:
        return f"unknown key '{key}'; check its spelling against {reference}"
    if type(error).__name__ == "MissingMandatoryValue" and key:
        return f"'{key}' is required; set it in the file or as {key}=..."
    return f"'{key}': {message}" if key else message
