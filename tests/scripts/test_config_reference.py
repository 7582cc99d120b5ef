"""docs/config.md is generated from the config dataclasses; it must match them."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_config_reference_is_up_to_date():
    result = subprocess.run([sys.executable, "scripts/config_reference.py", "--check"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_config_key_has_an_explanation():
    rows = [line for line in (REPO / "docs" / "config.md").read_text().splitlines() if line.startswith("| `")]
    assert len(rows) > 50
    unexplained = [row.split("|")[1].strip() for row in rows if row.rstrip().endswith("|  |")]
    assert unexplained == [], f"config fields without a comment: {unexplained}"
