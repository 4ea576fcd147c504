"""The README's Python examples run as written."""
import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def python_section_examples():
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_python_examples():
    assert python_section_examples(), "README: no ```python block under ## Python"


def test_readme_python_examples_run():
    for example in python_section_examples():
        exec(compile(example, str(README), "exec"), {})


def test_the_package_works_without_torch():
    """numpy-only users: torch is never imported, and numpy arrays work."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, specdec_kernels as sk\n"
        "r = sk.greedy_verify(np.eye(3, 5, dtype=np.float32), np.array([0, 1], np.int32), np.array([0, 2], np.int32))\n"
        "assert r.accepted_counts.tolist() == [2] and r.emitted_tokens.tolist() == [[0, 1, 2]], r\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
