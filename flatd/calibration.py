"""The dark/bias library and the choice of a calibration frame for each flat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from flatd.frames import Frame


@dataclass(frozen=True)
class Calibration:
    """What is subtracted from one flat before combining."""

    mode: Literal["none", "pedestal", "file"] = "none"
    pedestal: float = 0.0
    frame: Optional[Frame] = None
    why: str = ""

    @property
    def label(self) -> str:
        """Short text for logs, dry runs and HISTORY cards."""
        if self.mode == "pedestal":
            return f"pedestal {self.pedestal:g}"
        if self.mode == "file" and self.frame is not None:
            return str(self.frame.path)
        return "none"


NO_CALIBRATION = Calibration()
