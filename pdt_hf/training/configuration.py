"""YAML recipe files: loading, ``key=value`` overrides, and strict dataclass construction.

Design decisions:
- A recipe is one YAML file with sections (``model``, ``pdt``, ``data``, ``train``, ``curriculum``,
  ``calibration``); ``pdt data build`` and ``recipes/train.py`` read the same file, so a dataset and the run
  that consumes it cannot disagree on K, B or the trunk.
- Overrides are dotted paths whose value is parsed as YAML (``train.lr=3e-4``, ``data.build.max_prompts.train=8``).
  A list element is addressed by index or, for the curriculum, by stage name (``curriculum.adapters.steps=5``).
- Unknown keys are errors that list the known ones; nothing is silently ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

__all__ = ["ConfigError", "apply_overrides", "build_dataclass", "dataclass_help", "load_yaml"]


class ConfigError(ValueError):
    """A recipe file or override is invalid; the message names the value and the fix."""


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping from ``path``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist; pass a file from recipes/configs/.")
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a YAML mapping of sections, got {type(data).__name__}.")
    return data


def _child(node: Any, key: str, path: str, create: bool) -> Any:
    if isinstance(node, dict):
        if key not in node:
            if not create:
                raise ConfigError(f"override {path!r}: no key {key!r} here; known keys: {sorted(node)}.")
            node[key] = {}
        return node[key]
    if isinstance(node, list):
        index = _list_index(node, key, path)
        return node[index]
    raise ConfigError(f"override {path!r}: cannot descend into {key!r} of a {type(node).__name__}.")


def _list_index(node: list, key: str, path: str) -> int:
    if key.lstrip("-").isdigit():
        index = int(key)
        if not -len(node) <= index < len(node):
            raise ConfigError(f"override {path!r}: index {index} out of range for a list of {len(node)}.")
        return index
    names = [item.get("name") for item in node if isinstance(item, dict)]
    if key not in names:
        raise ConfigError(f"override {path!r}: unknown stage {key!r}; stages are {names}.")
    return names.index(key)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` applied (value parsed as YAML).

    Missing mappings are created (their keys are checked when the dataclasses are built); a curriculum stage
    must exist.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.lr=3e-4.")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {item!r} has an empty key.")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err}).") from None
        node: Any = data
        for key in keys[:-1]:
            node = _child(node, key, path, create=keys[0] != "curriculum")
        last = keys[-1]
        if isinstance(node, list):
            node[_list_index(node, last, path)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {path!r}: {'.'.join(keys[:-1])} is not a mapping.")
    return data


def _resolve_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def build_dataclass(cls: type[T], data: Any, where: str) -> T:
    """Construct dataclass ``cls`` from a mapping, recursing into dataclass-typed fields.

    Unknown keys raise :class:`ConfigError` naming ``where`` (e.g. ``train``) and the known keys; a
    ``ValueError`` from the dataclass's own validation is re-raised with ``where`` prefixed.
    """
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"section {where!r} must be a mapping, got {type(data).__name__} ({data!r}).")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in section {where!r}; known keys: {sorted(fields)}.")
    kwargs = {}
    for name, value in data.items():
        tp = _resolve_type(hints[name])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = build_dataclass(tp, value, f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def dataclass_help(cls: type) -> dict[str, str]:
    """``{field: help string}`` of a config dataclass (used by docs and ``--help``)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
