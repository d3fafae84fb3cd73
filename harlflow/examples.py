"""The bundled example models, by name: ``harlflow optimize harlflow.examples:small_cnn``.

:data:`NAMES` is all that is importable without PyTorch (the CLI's choices); the factories
themselves live in :mod:`harlflow._example_models` and load on first use.
"""

from __future__ import annotations

NAMES = (
    "tiny_mlp", "small_cnn", "resnet18", "bert_encoder", "vit_small", "inception_small",
    "squeezenet_small",
)  # fmt: skip


def __getattr__(name: str):
    """``EXAMPLES`` (name -> factory) and each factory, imported with PyTorch when first asked."""
    if name in NAMES or name == "EXAMPLES":
        from harlflow import _example_models

        factories = {n: getattr(_example_models, n) for n in NAMES}
        return factories if name == "EXAMPLES" else factories[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
