"""The README documents what the code does: every setting with its real default, both commands."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic_core import PydanticUndefined

from streamer.config import setting_fields

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
CI = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()


def test_readme_config_table_lists_every_setting_with_its_default():
    rows = {m[0]: m for m in re.findall(r"^\| `(STREAMER_\w+)` \| `(--[\w-]+)` \| `([^`]*)` \|",
                                        README, re.MULTILINE)}
    for field in setting_fields():
        assert field.env_var in rows, f"{field.env_var} missing from the README table"
        _, flag, default = rows[field.env_var]
        assert flag == field.flag
        expected = field.info.default
        if expected is PydanticUndefined or field.info.default_factory is not None:
            expected = ""
        assert default == str(expected), f"{field.env_var}: README {default!r} vs {expected!r}"


def test_ci_runs_the_readme_test_command():
    command = re.search(r"\*\*Run the tests\*\*.*?```bash\n(.+?)\n```", README, re.DOTALL)[1]
    assert command in CI.splitlines()
    assert "pip install -q torch==2.13.0" in CI and "'.[dev,local]'" in CI
