"""Import TVM's tensor intrinsics without CPython's slow ``inspect.stack()``.

``tvm.s_tir.tensor_intrin`` parses ~500 TVMScript functions at import time, and each parse calls
``inspect.stack()``, which on CPython 3.11 resolves every frame's module by scanning all of
``sys.modules``: the import took ~48 s on our 2-core machines, on every process that builds a
MetaSchedule ``TuneContext``. TVMScript reads only ``frame``, ``lineno`` and the one line of
``code_context`` of each entry, so during that one import we hand it an equivalent stack built
straight from the frames and ``linecache``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import linecache
import sys
from collections.abc import Iterator


def _fast_stack(context: int = 1) -> list[inspect.FrameInfo]:
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        line = linecache.getline(code.co_filename, frame.f_lineno) if context > 0 else ""
        frames.append(
            inspect.FrameInfo(
                frame,
                code.co_filename,
                frame.f_lineno,
                code.co_name,
                [line] if line else None,
                0 if line else None,
            )
        )
        frame = frame.f_back
    return frames


@contextlib.contextmanager
def _fast_inspect_stack() -> Iterator[None]:
    original = inspect.stack
    inspect.stack = _fast_stack
    try:
        yield
    finally:
        inspect.stack = original


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (idempotent) with the fast stack in place."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    with _fast_inspect_stack():
        importlib.import_module("tvm.s_tir.tensor_intrin")
