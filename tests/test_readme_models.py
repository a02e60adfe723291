"""The README's architecture table names exactly the architectures the conformance matrix checks."""

from __future__ import annotations

import re
from pathlib import Path

from mlx_loom.models.layout import TESTED_ARCHITECTURES, TESTED_HYBRIDS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_matches_the_tested_architectures():
    text = README.read_text().split("### Models", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| ") and "refused" not in line]
    served = {name.strip() for line in rows[1:] for name in line.split("|")[1].split(",")}
    assert served == set(TESTED_ARCHITECTURES) | set(TESTED_HYBRIDS)
    assert re.search(r"deepseek_v32, llama4 \| refused", text)  # the unpaged layouts' refusal
    assert re.search(r"plamo3, afm7 \| refused", text)  # mlx-lm code that pages cannot reproduce
