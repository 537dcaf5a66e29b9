"""Suite-wide test settings.

Hypothesis: the default profile is derandomized, so every CI run draws the same examples and a
red run is reproducible from the commit alone. ``HYPOTHESIS_PROFILE=explore`` draws fresh random
examples (run it when changing the index or the codes: it is how the one-item-shard MIH blow-up
was found)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))  # for _tiny (shared tiny set-ups)

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
