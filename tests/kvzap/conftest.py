"""tests/kvzap reuse the kvpress reference harness of tests/kvjax."""

import sys
from pathlib import Path

_KVJAX_TESTS = str(Path(__file__).resolve().parents[1] / "kvjax")
if _KVJAX_TESTS not in sys.path:
    sys.path.insert(0, _KVJAX_TESTS)
