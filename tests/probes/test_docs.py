"""The examples in the probes' docstrings run and print what they say."""
import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["haystack", "scoring", "mqar", "plots", "generators", "runs", "hf", "cli", "runner", "formats"])
def test_docstring_examples(name):
    module = importlib.import_module(f"memlayers.probes.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_import_memlayers_probes_stays_light():
    import subprocess
    import sys

    code = "import sys, memlayers.probes; print(any(m.split('.')[0] in ('transformers', 'matplotlib') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
