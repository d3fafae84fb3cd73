"""harlflow: a trained model in, a faster, verified, compiled artifact out.

The CLI lives in :mod:`harlflow.cli`; the deployment runtime in :mod:`harlflow.runtime`.
"""

__version__ = "0.1.0"
