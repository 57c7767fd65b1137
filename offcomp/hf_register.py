"""Register offcomp's quantizer with transformers without importing transformers (or torch) early.

`import offcomp` must stay cheap (the CLI answers --help without torch), yet `from_pretrained` of a
compressed checkpoint must find `quant_method: "offcomp"` whenever offcomp has been imported. So:
if transformers' quantizer table is already loaded, register now; otherwise a one-shot import
hook registers right after `transformers.quantizers.auto` is first executed (which happens before
any `from_pretrained` can run).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    # hf_integration registers itself when its import completes; if it is the module whose import
    # pulled transformers' table in, it is mid-import here and finishes (and registers) on its own.
    importlib.import_module(".hf_integration", __package__)


class _AfterQuantizerTable(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from finding us again
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _register()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterQuantizerTable) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterQuantizerTable())
