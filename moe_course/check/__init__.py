"""Exercise checks of every notebook. A learner calls e.g. ``check.topk_router(my_router)``.

Each check runs the learner's function on small, fixed inputs, compares it with the reference
implementation, and raises :class:`CheckError` with a message that names the likely mistake. On success it
prints one line starting with ``OK``. Every submodule's public functions are re-exported here, so the
notebooks only ever need ``from moe_course import check``.
"""

from __future__ import annotations

import importlib
import pkgutil

from moe_course.check._core import CheckError

__all__ = ["CheckError"]

for _info in pkgutil.iter_modules(__path__):
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", []):
        if _name in globals():
            raise ImportError(f"check name {_name!r} is defined twice (again in {_module.__name__})")
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
