"""``python -m harlflow.measure``: the measuring worker (:mod:`harlflow.measure.worker`)."""

import sys

from harlflow.measure.worker import main

sys.exit(main())
