"""The README's main job, `python -m dms.demo`: the built-in tiny model's run, flags, and questions."""

import pytest

from dms import demo


def test_demo_runs_and_reports_compression(capsys):
    assert demo.main(["--model", "tiny", "--prompt-tokens", "200", "--new-tokens", "8", "--chunk", "64"]) == 0
    out = capsys.readouterr().out
    assert "compression per layer" in out and "eviction off" in out
    dms_line = next(line for line in out.splitlines() if line.startswith("DMS "))
    ratio = float(dms_line.split()[-1].rstrip("x"))
    assert ratio > 1.2  # the built-in adapters really evict


@pytest.mark.parametrize("argv, message", [
    (["--prompt-tokens", "0"], "--prompt-tokens: expected a prompt length (an integer >= 1), got 0"),
    (["--prompt-tokens", "-5"], "--prompt-tokens: expected a prompt length (an integer >= 1), got -5"),
    (["--new-tokens", "x"], "--new-tokens: expected a number of tokens (an integer >= 1), got 'x'"),
    (["--chunk", "-1"], "--chunk: expected a chunk size, 0 for one prefill (an integer >= 0), got -1"),
    (["--device", "tpu"], "--device: expected cpu or cuda[:N], got 'tpu'"),
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: cannot load it"),
])
def test_bad_flags_get_a_usage_message_not_a_traceback(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_chunk_zero_prefills_at_once(capsys):
    assert demo.main(["--model", "tiny", "--prompt-tokens", "80", "--new-tokens", "2", "--chunk", "0"]) == 0
    assert "(one prefill)" in capsys.readouterr().out


def test_questions_mode_answers_recall_prompts_with_dms_on_and_off(tmp_path, capsys):
    from dms.tiny import save_tiny

    path = save_tiny(str(tmp_path / "tiny"), seed=0)
    assert demo.main(["--model", path, "--questions", "3", "--prompt-tokens", "300", "--chunk", "128"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in ("niah", "vt", "mqar")]
    assert [r[0] for r in rows] == ["niah", "vt", "mqar"]
    assert all(float(r[4].rstrip("x")) > 1.0 for r in rows)  # the tiny adapters evict
    assert all(int(r[5].replace(",", "")) < int(r[6].replace(",", "")) or float(r[4].rstrip("x")) < 1.1 for r in rows)
    assert "right: DMS " in out and "/3, eviction off " in out
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--model", "tiny", "--questions", "2"])
    assert exit_info.value.code == 2 and "--questions: needs a trained model" in capsys.readouterr().err


def test_fp8_pages_shrink_the_dms_run_s_kv_bytes(capsys):
    """--kv-dtype: the DMS run's pages hold one byte per element (and a scale
    per row); the eviction-off run stays a plain cache in --dtype."""
    argv = ["--model", "tiny", "--prompt-tokens", "200", "--new-tokens", "4", "--chunk", "64"]
    used = {}
    for kv in ("auto", "fp8_e4m3"):
        assert demo.main(argv + ["--kv-dtype", kv]) == 0
        out = capsys.readouterr().out
        assert f"DMS pages {kv}" in out
        lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("DMS ", "eviction"))}
        used[kv] = (int(lines["DMS"][2].replace(",", "")), int(lines["eviction"][3].replace(",", "")))
    assert used["auto"][1] == used["fp8_e4m3"][1]  # the dense float32 reference is the same
    assert used["fp8_e4m3"][0] * 3 < used["auto"][0]  # float32 -> 1 byte + a 4-byte scale per 32 elements
    with pytest.raises(SystemExit):
        demo.main(argv + ["--kv-dtype", "int4"])
    assert "--kv-dtype: invalid choice: 'int4'" in capsys.readouterr().err
