"""`streamer replay --plot`: a picture for any replay, even one with little or nothing scored."""

from __future__ import annotations

import pytest

from streamer.tools.cli import main

pytest.importorskip("matplotlib")


@pytest.fixture
def titles(monkeypatch) -> list[str]:
    """The axes titles of every figure saved during the test."""
    from matplotlib.figure import Figure

    seen: list[str] = []
    save = Figure.savefig

    def recording(fig, *args, **kwargs):
        seen.extend(ax.get_title() for ax in fig.axes)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return seen


def _replay_plot(tmp_path, csv_text: str, *flags: str):
    path, png = tmp_path / "readings.csv", tmp_path / "replay.png"
    path.write_text(csv_text)
    code = main(["replay", str(path), "--device", "cpu", "--plot", str(png), *flags])
    return code, png


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("rows", ["", "a,1717171717,1\nb,1717171717,2\n"],
                         ids=["header-only", "one-reading-per-sensor"])
def test_a_replay_with_no_scored_pairs_still_plots_and_says_so(tmp_path, titles, rows):
    code, png = _replay_plot(tmp_path, "sensor_id,ts,value\n" + rows)
    assert code == 0 and _is_png(png)
    assert titles[-1] == "skill: no forecast has met its sensor's next reading"


def test_skill_rolls_over_half_the_pairs_when_there_are_fewer_than_twice_the_window(
        tmp_path, titles):
    rows = "".join(f"{s},{1717171717 + 60 * i},{(i * 7 + len(s)) % 11}\n"
                   for i in range(31) for s in ("a", "b"))  # 30 pairs per sensor
    code, png = _replay_plot(tmp_path, "sensor_id,ts,value\n" + rows)
    assert code == 0 and _is_png(png)
    assert titles[-1] == "skill = 1 - MAE/persistence MAE, rolling over 30 forecasts"


def test_plotting_a_sensor_the_file_does_not_have_warns_and_plots_the_others(
        tmp_path, titles, capsys):
    rows = "".join(f"a,{1717171717 + 60 * i},{i % 5}\n" for i in range(20))
    code, png = _replay_plot(tmp_path, "sensor_id,ts,value\n" + rows,
                             "--plot-sensors", "a,nosuch")
    assert code == 0 and _is_png(png)
    err = capsys.readouterr().err
    assert "--plot-sensors: no readings of nosuch" in err and "plotting the others" in err, err
    assert len(titles) == 2 and titles[0].startswith("a ")
