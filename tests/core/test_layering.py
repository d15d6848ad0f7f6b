"""medunic_core knows nothing of Flower: every core module imports with flwr blocked."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import medunic_core


def test_core_imports_without_flwr():
    modules = [m.name for m in pkgutil.walk_packages(medunic_core.__path__, "medunic_core.")]
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'flwr' or name.startswith('flwr.'):\n"
        "            raise ImportError('flwr is blocked in medunic_core')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {modules!r}:\n"
        "    __import__(m)\n"
        "print(len(sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(modules) > 10
