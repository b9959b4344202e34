"""Old home of the benchmarks, kept for one release: they are the top-level package `benchmarks` now (not part of
the library). `from streaming_engine.eval.X import ...` and `python -m streaming_engine.eval.X` still work and warn
(DeprecationWarning) with the new path; this path goes in the next release.

How: a finder on `sys.meta_path` answers every `streaming_engine.eval.X` with the module `benchmarks.X` itself (one
module object under both names, so state and `isinstance` checks agree), and has `python -m` run the new module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

NEW_HOME = "benchmarks"


def _new_name(old: str) -> str:
    return NEW_HOME + old[len(__name__):]


def _moved(old: str) -> str:
    return f"{old} moved to {_new_name(old)} (this path goes in the next release)"


class _OldPath(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(__name__ + "."):
            return None
        new = importlib.util.find_spec(_new_name(fullname))
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=new.origin,
                                               is_package=new.submodule_search_locations is not None)

    def create_module(self, spec):
        warnings.warn(_moved(spec.name), DeprecationWarning, stacklevel=2)
        return importlib.import_module(_new_name(spec.name))

    def exec_module(self, module):
        pass  # it ran under its new name in create_module

    def get_code(self, fullname):
        # Only `python -m` asks for the code: it is a program that runs the new module as `__main__` (as
        # `python -m benchmarks.X` would, so its siblings import under their new names). The warning is attributed
        # to `__main__`, which Python's default filters show, so whoever types the old command sees the new one.
        new = importlib.util.find_spec(_new_name(fullname))
        warnings.warn_explicit(_moved(fullname), DeprecationWarning, new.origin, 1, module="__main__")
        return compile(f"import runpy\nrunpy.run_module({new.name!r}, run_name='__main__', alter_sys=True)",
                       new.origin, "exec")

if not any(isinstance(finder, _OldPath) for finder in sys.meta_path):
    sys.meta_path.insert(0, _OldPath())
