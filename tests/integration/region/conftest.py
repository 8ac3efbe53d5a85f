from __future__ import annotations

import sys
from pathlib import Path

# The fault tests run churn.py as a child and import it as a module.
sys.path.insert(0, str(Path(__file__).resolve().parent))
