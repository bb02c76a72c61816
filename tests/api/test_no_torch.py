import subprocess
import sys


def test_the_api_never_imports_torch_or_transformers():
    code = "import sys, api.main; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
