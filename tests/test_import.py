"""`import memlayers` stays lean: torch only, no faiss/transformers/triton, CUDA untouched."""
import subprocess
import sys

CHECK = """
import sys, torch
import memlayers as ml
heavy = [m for m in ("faiss", "transformers", "triton", "matplotlib") if m in sys.modules]
assert not heavy, f"import memlayers imported {heavy}"
assert not torch.cuda.is_initialized(), "import memlayers initialized CUDA"
for name in ml.__all__:
    getattr(ml, name)
print("ok")
"""


def test_import_is_lean():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
