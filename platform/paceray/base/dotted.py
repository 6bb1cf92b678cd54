"""Dotted config paths (`curriculum.order`): a nested config read, written and flattened by them."""

from __future__ import annotations

from typing import Any

from paceray.base.errors import PacerayError


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_path(d: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = d
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise PacerayError(f"--set {dotted}: {p} is not a section")
        node = child
    node[leaf] = value


def get_path(d: dict, dotted: str) -> Any:
    node = d
    for part in dotted.split("."):
        node = node[part]
    return node


def unflatten(point: dict) -> dict:
    out: dict = {}
    for key, value in point.items():
        set_path(out, key, value)
    return out
