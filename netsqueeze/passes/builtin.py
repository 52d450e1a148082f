"""Imports every module of `netsqueeze.passes` so that their `@register_pass` decorators run.

A new built-in pass is one module in this package; nothing else needs editing to register it.
"""

import importlib
import pkgutil

import netsqueeze.passes as _package

for _info in sorted(pkgutil.iter_modules(_package.__path__), key=lambda i: i.name):
    if _info.name != "builtin":
        importlib.import_module(f"{_package.__name__}.{_info.name}")
