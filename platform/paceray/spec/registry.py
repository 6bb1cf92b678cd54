"""Finding trainables: entry points of the group `paceray.trainables`, or a dotted import path.

`trainable: denoiser` in a spec names an entry point; `trainable: my_pkg.my_module:TRAINABLE`
(or `my_pkg.my_module.TRAINABLE`) names an object directly, so a trainable can live in a module
of its own without being installed as a distribution.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from paceray.base.errors import PacerayError, one_line
from paceray.protocol import ENTRY_POINT_GROUP, Trainable


def registered() -> dict:
    """Entry point name -> EntryPoint (nothing imported yet)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def resolve(ref: str, where: str = "spec") -> Trainable:
    """The `Trainable` a spec's `trainable` names; one line naming `where` if it names none."""
    eps = registered()
    if ref in eps:
        obj = eps[ref].load()
    elif ":" in ref or "." in ref:
        module, _, attr = ref.partition(":") if ":" in ref else ref.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                raise PacerayError(f"{where}: trainable: no module {e.name!r} (from {ref!r})") from None
            raise
        except AttributeError:
            raise PacerayError(f"{where}: trainable: module {module!r} has no {attr!r}") from None
    else:
        known = ", ".join(sorted(eps)) or "none installed"
        raise PacerayError(one_line(f"{where}: trainable: no trainable named {ref!r} (registered: {known}; "
                                    f"or give a dotted path module:OBJECT)"))
    if not isinstance(obj, Trainable):
        raise PacerayError(f"{where}: trainable: {ref!r} is a {type(obj).__name__}, not a paceray.protocol.Trainable")
    return obj


def all_trainables() -> list[Trainable]:
    """Every registered trainable (for mounting their CLI commands)."""
    return [resolve(name, "entry point") for name in sorted(registered())]
