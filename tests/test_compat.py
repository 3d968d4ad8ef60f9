"""distqat.compat.import_torchvision in a fresh interpreter: torchvision's models and
transforms work after it, transformers' models import, and a second call changes nothing."""

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torchvision")

SCRIPT = textwrap.dedent("""
    import sys, torch
    from distqat.compat import import_torchvision
    tv = import_torchvision()
    assert import_torchvision() is tv is sys.modules["torchvision"]
    m = tv.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    from torchvision.transforms import v2
    img = torch.rand(3, 40, 40)
    out = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                      v2.Normalize([0.5] * 3, [0.25] * 3)])(img)
    assert out.shape == (3, 32, 32)
    from transformers import GPT2LMHeadModel, GPTNeoForCausalLM, Wav2Vec2Model  # noqa: F401
    print("OK")
""")


def test_torchvision_and_transformers_work_after_import_torchvision():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")
