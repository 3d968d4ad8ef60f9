"""Work-arounds for the packages around us, each with the reason it exists."""

from __future__ import annotations

import logging
import sys
from types import ModuleType
from typing import Optional

import torch

log = logging.getLogger(__name__)

# Kept alive for the life of the process: dropping a ``torch.library.Library`` removes the
# operator schemas it defined.
_TORCHVISION_OPS_LIB: Optional[torch.library.Library] = None

_MISSING_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor",
)


def _drop_torchvision_modules() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision() -> ModuleType:
    """``import torchvision``, repaired where its compiled ops do not match torch.

    Why: PyPI's torchvision wheels link CUDA libraries; next to a CPU-only torch build its
    ``_C`` extension does not load, torchvision swallows that error and then registers a
    fake kernel for ``torchvision::nms``, an operator nobody defined, so the import fails with
    "operator torchvision::nms does not exist". transformers imports torchvision whenever it
    is installed, so every transformers model fails with it.

    Fix (only after that first import failed; where torch and torchvision match nothing is
    done): drop the half-imported ``torchvision*`` modules, define the schemas of the two
    operators its import-time registrations need (``nms``, ``qnms``) in a
    ``torch.library.Library("torchvision", "DEF")`` kept alive here, and import again. The
    models and ``transforms.v2`` then work; only ``torchvision.ops.nms`` (and what calls it)
    raises, for want of a kernel. Idempotent: later calls return the imported module.
    """
    global _TORCHVISION_OPS_LIB
    module = sys.modules.get("torchvision")
    if module is not None:
        return module
    try:
        import torchvision
        return torchvision
    except RuntimeError as first:
        if "torchvision::" not in str(first) or _TORCHVISION_OPS_LIB is not None:
            raise
        _drop_torchvision_modules()
        lib = torch.library.Library("torchvision", "DEF")
        for schema in _MISSING_OPS:
            lib.define(schema)
        _TORCHVISION_OPS_LIB = lib
        try:
            import torchvision
        except Exception:
            _drop_torchvision_modules()
            raise
        log.warning("torchvision's compiled ops do not match this torch (%s); declared the "
                    "missing operator schemas: models and transforms work, ops.nms does not",
                    first)
        return torchvision
