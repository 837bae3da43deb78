"""Reading back the onnx_export stage's report (what the evaluate stage copies into metrics.json)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DataError

REQUIRED = ("image", "text", "zeroshot", "opset")


def read_onnx_report(path: str | os.PathLike) -> dict:
    """The JSON object of ``reports/onnx.json``; DataError naming the file when it is not one."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not an ONNX report ({type(err).__name__})") from None
    if not isinstance(report, dict) or any(key not in report for key in REQUIRED):
        raise DataError(f"{path}: an ONNX report needs the keys {', '.join(REQUIRED)}")
    return report
