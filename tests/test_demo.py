"""The README's main job, `python -m dms.demo`, on the built-in tiny model."""

from dms import demo


def test_demo_runs_and_reports_compression(capsys):
    assert demo.main(["--prompt-tokens", "200", "--new-tokens", "8", "--chunk", "64"]) == 0
    out = capsys.readouterr().out
    assert "compression per layer" in out and "eviction off" in out
    dms_line = next(line for line in out.splitlines() if line.startswith("DMS "))
    ratio = float(dms_line.split()[-1].rstrip("x"))
    assert ratio > 1.2  # the built-in adapters really evict
