"""The README's Python snippets, for the tests that run them as written."""

import re
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets(containing: str) -> list[str]:
    """The README's ```python blocks that contain `containing`."""
    return [code for code in re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL) if containing in code]
