"""Work-arounds for the packages around us, each with the reason it exists."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def hide_broken_torchvision() -> None:
    """transformers imports torchvision whenever it is installed. A torchvision whose
    compiled ops do not match the installed torch (as with the CPU-only torch build: the
    import fails with "operator torchvision::nms does not exist") takes every transformers
    model down with it. The language models need nothing from torchvision, so when it
    cannot be imported it is hidden, and transformers carries on without it."""
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as e:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # type: ignore[assignment]
        log.warning("torchvision does not import (%s); transformers will run without it", e)
