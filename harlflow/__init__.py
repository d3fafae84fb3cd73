"""harlflow: a trained model in, a faster, verified, compiled artifact out.

The CLI lives in :mod:`harlflow.cli`; the deployment runtime in :mod:`harlflow.runtime`; the
lowest layer (errors, config, targets, ...) in :mod:`harlflow.core`; the RL pieces HARL and
X-RLflow share in :mod:`harlflow.rl`. The README's "Layout" section draws the layers.
"""

__version__ = "0.1.0"
