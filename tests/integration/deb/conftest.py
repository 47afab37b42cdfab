from __future__ import annotations

from tests.harness.deb import spinbox_deb

__all__ = ["spinbox_deb"]
