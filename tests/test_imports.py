"""Import layering: importing nmfx loads no kernel module (the C++ loader and the Triton kernels are
imported when first used), and nothing in the kernels package imports the op module back."""

import ast
import subprocess
import sys
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "nmfx" / "kernels"


def test_import_nmfx_loads_no_kernel_module():
    code = ("import sys, nmfx, nmfx.passes.lower_inference\n"
            "print(sorted(m for m in sys.modules if m.startswith('nmfx.kernels.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['nmfx.kernels.nm_linear_args']"  # the op's argument contract only


def test_kernels_never_import_the_op_module():
    for path in KERNELS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("nmfx.inference_ops") for n in names), f"{path.name} imports {names}"
