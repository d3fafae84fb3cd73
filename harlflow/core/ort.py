"""onnxruntime session options the way harlflow uses them everywhere: a graph optimisation level
by name, intra-op threads, one inter-op thread."""

from __future__ import annotations

LEVELS = ("disable", "basic", "extended", "all")


def session_options(level: str = "all", threads: int = 1):
    """``ort.SessionOptions`` at optimisation ``level`` (one of :data:`LEVELS`) on ``threads``
    intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return so
