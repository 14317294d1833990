"""The README documents what the code does: every setting with its real default, both commands."""

from __future__ import annotations

import json
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


def _json_examples() -> list[dict]:
    """Every one-line example in the README's JSON blocks that is JSON as written."""
    examples = []
    for block in re.findall(r"```json\n(.*?)```", README, re.DOTALL):
        for line in block.splitlines():
            try:
                examples.append(json.loads(line))
            except ValueError:
                continue  # elided with "..."
    return examples


def test_readme_shows_the_anomaly_event_of_several_features_as_the_codec_writes_it():
    import numpy as np

    from streamer.serving.codec import encode_anomalies

    example = next(e for e in _json_examples() if e.get("anomaly") is True and "values" in e)
    n = len(example["values"])
    lists = [np.array([example[k]], dtype=np.float64) for k in ("values", "forecast", "lower",
                                                                 "upper")]
    event = json.loads(encode_anomalies([example["sensor_id"]], np.array([example["ts"]]),
                                        *lists, np.array([example["anomaly_score"]]),
                                        [example["partition"]], [example["offset"]])[0])
    assert list(event) == list(example)
    assert all(len(example[k]) == n for k in ("forecast", "lower", "upper"))
    assert event == {**example, "ts": float(example["ts"])}


def test_readme_gives_replays_output_columns_for_several_features():
    from streamer.tools.replay import forecasts_header, horizon_header

    assert f"`{','.join(forecasts_header(2))}`" in README
    assert f"`{','.join(horizon_header(2))}`" in README
