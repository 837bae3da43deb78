"""The embedded default's builders live in scripts/, not in the library; tests import them from here."""
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.append(str(SCRIPTS))  # appended: never shadows a test or library module

import digits_dataset  # noqa: E402

__all__ = ["digits_dataset"]
