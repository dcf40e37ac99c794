"""`speechlm transcribe` end to end: inputs, manifests, failures, output order and formats
(`speechlm.inference.cli`)."""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
import soundfile as sf

from speechlm.audio import load_audio
from speechlm.cli import main
from speechlm.inference.cli import collect_inputs
from speechlm.inference.decoding import transcribe_arrays
from speechlm.loading import load_pretrained
from tests.conftest import make_clips
from tests.inference.conftest import SR, needs_espeak, save
from tests.inference.test_structured import ROT, SCHEMA, TIME, TOKENS, follows_schema


def write_wav(path, audio):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, SR, subtype="FLOAT" if path.suffix == ".wav" else "PCM_16")
    return path


@pytest.fixture(scope="module")
def mixed_run(saved_model, tmp_path_factory):
    """One `transcribe` run over a folder (good, broken, too short and non-audio files) and a manifest (a good line, a
    bad JSON line, a missing file) -> (exit code, stderr, output folder, the three good files)."""
    tmp_path = tmp_path_factory.mktemp("mixed")
    clips = make_clips((0.5, 0.9, 0.3))
    data = tmp_path / "data"
    write_wav(data / "a.wav", clips[0])
    write_wav(data / "sub" / "b.wav", clips[1])
    (data / "sub" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio")
    write_wav(data / "click.wav", np.full(5, 0.1, dtype=np.float32))
    (data / "notes.txt").write_text("not audio, not picked up")
    write_wav(tmp_path / "extra" / "c.flac", clips[2])
    manifest = tmp_path / "extra" / "list.jsonl"
    manifest.write_text(
        json.dumps({"audio": "c.flac", "id": "utt-c", "text": "reference"}) + "\n"
        + "{not json\n" + json.dumps({"audio": "missing.wav"}) + "\n"
    )  # fmt: skip
    out = tmp_path / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([
            "transcribe", str(data), str(manifest), "--model", str(saved_model), "--format", "json",
            "--output", str(out), "--max-new-tokens", "4", "--batch-size", "2", "--quiet",
        ])  # fmt: skip
    good = [data / "a.wav", data / "sub" / "b.wav", tmp_path / "extra" / "c.flac"]
    return code, err.getvalue(), out, good


def test_cli_reports_every_failure_and_goes_on(mixed_run):
    code, err, _, _ = mixed_run
    assert code == 1
    assert "broken.wav" in err and "missing.wav" in err and "list.jsonl:2" in err
    assert "click.wav: audio is 0.000 s long, shorter than min_seconds=0.1" in err
    assert "transcribed 3 file(s), 4 failed" in err


def test_cli_writes_one_file_per_input_as_batched_decoding_reads(mixed_run, saved_model):
    _, _, out, good = mixed_run
    processor, model = load_pretrained(str(saved_model))
    expected = transcribe_arrays(model, processor, [load_audio(path, SR) for path in good], max_new_tokens=4)
    written = {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob("*.json")}
    assert sorted(written) == ["a.json", "sub/b.json", "utt-c.json"]
    assert [written[name]["text"] for name in ("a.json", "sub/b.json", "utt-c.json")] == expected
    assert written["utt-c.json"]["id"] == "utt-c"
    assert written["a.json"]["segments"] == [{"start": 0.0, "end": 0.5, "text": expected[0]}]


def test_cli_stdout_keeps_input_order(saved_model, tmp_path, capsys):
    clips = make_clips((0.9, 0.4))
    first, second = write_wav(tmp_path / "first.wav", clips[0]), write_wav(tmp_path / "second.wav", clips[1])
    code = main(["transcribe", str(first), str(second), "--model", str(saved_model), "--max-new-tokens", "4",
                 "--quiet"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    processor, model = load_pretrained(str(saved_model))
    texts = transcribe_arrays(model, processor, clips, max_new_tokens=4)
    assert out == f"==> {first} <==\n{texts[0]}\n==> {second} <==\n{texts[1]}\n"


def test_cli_caps_each_chunk_by_its_length(saved_model, tmp_path, capsys):
    clip = make_clips((0.9,))[0]
    path = write_wav(tmp_path / "clip.wav", clip)
    code = main(["transcribe", str(path), "--model", str(saved_model), "--max-new-tokens", "40", "--tokens-per-second",
                 "2", "--quiet"])  # fmt: skip
    processor, model = load_pretrained(str(saved_model))
    capped = transcribe_arrays(model, processor, [clip], max_new_tokens=40, tokens_per_second=2.0)
    assert capped != transcribe_arrays(model, processor, [clip], max_new_tokens=40)  # the cap cut something
    assert code == 0 and capsys.readouterr().out == f"{capped[0]}\n"


@needs_espeak
def test_cli_long_file_to_subtitles(saved_model, recording, capsys):
    path, intervals = recording
    code = main(["transcribe", str(path), "--model", str(saved_model), "--format", "vtt", "--max-new-tokens", "3",
                 "--batch-size", "16", "--quiet"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("WEBVTT\n\n")
    cues = [line for line in out.splitlines() if "-->" in line]
    assert 0 < len(cues) <= len(intervals)
    assert cues[0].startswith("00:00:0")


def test_bad_manifest_ids_and_non_utf8_lines_are_reported_and_the_rest_go_on(tmp_path):
    for name in ("a", "b"):
        sf.write(tmp_path / f"{name}.wav", np.zeros(1600, dtype=np.float32), 16000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'{"audio": "a.wav", "id": "' + b"x" * 300 + b'"}\n'
                         b'{"audio": "a.wav", "id": "nul\\u0000id"}\n'
                         b'{"audio": "a.wav", "id": "caf\xe9"}\n'
                         b'{"audio": "b.wav", "id": "fine"}\n')
    inputs, errors = collect_inputs([str(manifest)])
    assert [item.id for item in inputs] == ["fine"]
    assert [error.split(": ")[0] for error in errors] == [f"{manifest}:{n}" for n in (1, 2, 3)]
    assert "at most 200 bytes" in errors[0] and "not UTF-8" in errors[2]


@pytest.fixture(scope="module")
def gpt2_folder(whisper_gpt2, tmp_path_factory):
    folder = save(*whisper_gpt2, tmp_path_factory.mktemp("gpt2-model"))
    path = folder / "a.wav"
    sf.write(path, make_clips((0.5,))[0], SR)
    return folder, path


def test_cli_refuses_new_tokens_beyond_the_position_limit_up_front(gpt2_folder, capsys):
    folder, path = gpt2_folder
    code = main(["transcribe", str(path), "--model", str(folder), "--max-new-tokens", "500", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "a 25 s chunk (--max-chunk-seconds)" in err and "max_new_tokens (500)" in err and "512 positions" in err
    assert "Traceback" not in err


def test_cli_takes_what_fits_the_position_limit(gpt2_folder):
    folder, path = gpt2_folder
    assert main(["transcribe", str(path), "--model", str(folder), "--max-new-tokens", "4", "--max-chunk-seconds",
                 "10", "--quiet"]) == 0  # fmt: skip


def test_quiet_transcription_shows_no_progress_bar_while_loading_either(gpt2_folder, capsys):
    from transformers.utils import logging as hf_logging

    folder, path = gpt2_folder
    assert main(["transcribe", str(path), "--model", str(folder), "--max-new-tokens", "4", "--quiet"]) == 0
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the process's own setting is given back


def test_cli_holds_each_answer_to_a_json_schema(saved_model, tmp_path, capsys):
    clips = make_clips((0.9, 0.4))
    paths = [write_wav(tmp_path / f"{name}.wav", clip) for name, clip in zip("ab", clips)]
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    code = main(["transcribe", *map(str, paths), "--model", str(saved_model), "--json-schema", str(schema),
                 "--max-new-tokens", str(TOKENS), "--format", "json", "--quiet"])  # fmt: skip
    texts = [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]
    processor, model = load_pretrained(str(saved_model))
    assert code == 0 and all(map(follows_schema, texts))
    assert texts == transcribe_arrays(model, processor, clips, max_new_tokens=TOKENS, json_schema=SCHEMA)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "Expecting property name"), ('{"type": "object", "minProperties": "x"}', "not usable"),
])  # fmt: skip
def test_cli_refuses_an_unusable_json_schema_before_loading(tmp_path, capsys, content, message):
    clip = write_wav(tmp_path / "a.wav", make_clips((0.5,))[0])
    schema = tmp_path / "schema.json"
    schema.write_text(content)
    code = main(["transcribe", str(clip), "--model", str(tmp_path / "no-model"), "--json-schema", str(schema)])
    err = capsys.readouterr().err
    assert code == 2 and f"error: --json-schema {schema}: " in err and message in err


@pytest.mark.parametrize("flag", ["--json-schema", "--regex"])
def test_cli_refuses_a_file_longer_than_one_chunk_under_a_held_answer(saved_model, tmp_path, capsys, flag):
    """A file cut in chunks would get one held answer per chunk: refused, named, and the other files still done."""
    short, long = (write_wav(tmp_path / f"{name}.wav", clip) for name, clip in zip("sl", make_clips((0.4, 1.2))))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    held = str(schema) if flag == "--json-schema" else TIME
    code = main(["transcribe", str(short), str(long), "--model", str(saved_model), flag, held,
                 "--max-chunk-seconds", "1", "--max-new-tokens", str(TOKENS), "--format", "json",
                 "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1 and f"{long}: 1.2 s is longer than --max-chunk-seconds (1 s)" in captured.err
    assert f"held to {flag} covers one clip" in captured.err and "transcribed 1 file(s), 1 failed" in captured.err


def test_cli_holds_each_answer_to_a_regex(saved_model, tmp_path, capsys):
    clips = make_clips((0.9, 0.4))
    paths = [write_wav(tmp_path / f"{name}.wav", clip) for name, clip in zip("ab", clips)]
    code = main(["transcribe", *map(str, paths), "--model", str(saved_model), "--regex", TIME,
                 "--max-new-tokens", str(TOKENS), "--format", "json", "--quiet"])  # fmt: skip
    texts = [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]
    processor, model = load_pretrained(str(saved_model))
    assert code == 0 and all(re.fullmatch(TIME, text) for text in texts)
    assert texts == transcribe_arrays(model, processor, clips, max_new_tokens=TOKENS, regex=TIME)


def test_cli_refuses_an_unusable_regex_before_loading(tmp_path, capsys):
    clip = write_wav(tmp_path / "a.wav", make_clips((0.5,))[0])
    code = main(["transcribe", str(clip), "--model", str(tmp_path / "no-model"), "--regex", "(unclosed"])
    assert code == 2 and "error: --regex: regex '(unclosed' is not usable" in capsys.readouterr().err


def test_cli_refuses_a_schema_and_a_regex_together(tmp_path, capsys):
    clip = write_wav(tmp_path / "a.wav", make_clips((0.5,))[0])
    with pytest.raises(SystemExit) as exit_info:
        main(["transcribe", str(clip), "--model", str(tmp_path / "m"), "--json-schema", "s.json", "--regex", TIME])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_cli_prefer_quoted_answers_with_the_best_quoted_beam(saved_model, tmp_path, capsys):
    clips = make_clips((0.55, 0.3, 0.8, 1.1), seed=3)
    paths = [write_wav(tmp_path / f"{name}.wav", clip) for name, clip in zip("abcd", clips)]
    (tmp_path / "rot.json").write_text(json.dumps(ROT))
    code = main(["transcribe", *map(str, paths), "--model", str(saved_model), "--json-schema",
                 str(tmp_path / "rot.json"), "--prefer-quoted", "--num-beams", "4", "--max-new-tokens", "64",
                 "--format", "json", "--quiet"])  # fmt: skip
    texts = [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]
    processor, model = load_pretrained(str(saved_model))
    options = {"max_new_tokens": 64, "num_beams": 4, "json_schema": ROT}
    assert code == 0 and texts == transcribe_arrays(model, processor, clips, prefer_quoted=True, **options)
    assert texts != transcribe_arrays(model, processor, clips, **options)


def test_cli_refuses_prefer_quoted_without_a_quoting_schema_before_loading(tmp_path, capsys):
    clip = write_wav(tmp_path / "a.wav", make_clips((0.5,))[0])
    (tmp_path / "plain.json").write_text(json.dumps(SCHEMA))
    for held in ([], ["--json-schema", str(tmp_path / "plain.json")]):
        code = main(["transcribe", str(clip), "--model", str(tmp_path / "no-model"), "--prefer-quoted", *held])
        assert code == 2 and "--prefer-quoted needs a --json-schema that quotes" in capsys.readouterr().err


def test_cli_refuses_prefer_quoted_without_beams(saved_model, tmp_path, capsys):
    clip = write_wav(tmp_path / "a.wav", make_clips((0.5,))[0])
    (tmp_path / "rot.json").write_text(json.dumps(ROT))
    code = main(["transcribe", str(clip), "--model", str(saved_model), "--json-schema", str(tmp_path / "rot.json"),
                 "--prefer-quoted", "--num-beams", "1", "--quiet"])  # fmt: skip
    assert code == 2 and "--prefer-quoted chooses among beams: give --num-beams >= 2" in capsys.readouterr().err


def test_cli_joint_ctc_weight_is_checked_before_any_work(saved_model, tmp_path, capsys):
    path = write_wav(tmp_path / "clip.wav", make_clips((0.5,))[0])
    with pytest.raises(SystemExit):
        main(["transcribe", str(path), "--model", str(saved_model), "--joint-ctc-weight", "1.5"])
    assert "--joint-ctc-weight: expected a number in [0, 1], got '1.5'" in capsys.readouterr().err
    code = main(["transcribe", str(path), "--model", str(saved_model), "--joint-ctc-weight", "0.3", "--quiet"])
    assert code == 2 and "--joint-ctc-weight needs a model with a CTC head" in capsys.readouterr().err


def test_cli_decodes_with_the_joint_ctc_weight_saved_with_the_models_head(build, tmp_path, capsys):
    processor, model = build("whisper", "qwen2")
    model.add_ctc_head(list(range(3, 80)), processor.tokenizer.all_special_ids)
    model.config.ctc_head["joint_weight"] = 0.5  # as the demo saves its models
    folder = save(processor, model, tmp_path / "model")
    path = write_wav(tmp_path / "clip.wav", make_clips((0.9,))[0])
    code = main(["transcribe", str(path), "--model", str(folder), "--max-new-tokens", "6", "--format", "json",
                 "--quiet"])  # fmt: skip
    text = json.loads(capsys.readouterr().out)["text"]
    processor, model = load_pretrained(str(folder))
    clip = load_audio(path, SR)
    joint = transcribe_arrays(model, processor, [clip], max_new_tokens=6, joint_ctc_weight=0.5)[0]
    assert code == 0 and text == joint != transcribe_arrays(model, processor, [clip], max_new_tokens=6)[0]


def test_cli_joint_ctc_head_candidates_change_how_the_head_proposes(build, tmp_path, capsys):
    processor, model = build("whisper", "qwen2")
    model.add_ctc_head(list(range(3, 80)), processor.tokenizer.all_special_ids)
    folder = save(processor, model, tmp_path / "model")
    path = write_wav(tmp_path / "clip.wav", make_clips((0.9,))[0])
    code = main(["transcribe", str(path), "--model", str(folder), "--max-new-tokens", "6", "--format", "json",
                 "--joint-ctc-weight", "0.9", "--joint-ctc-head-candidates", "0", "--quiet"])  # fmt: skip
    text = json.loads(capsys.readouterr().out.splitlines()[-1])["text"]  # the last line: a library may log before
    processor, model = load_pretrained(str(folder))
    clip = load_audio(path, SR)
    kwargs = dict(max_new_tokens=6, joint_ctc_weight=0.9)
    without = transcribe_arrays(model, processor, [clip], **kwargs, joint_ctc_head_candidates=0)[0]
    assert code == 0 and text == without != transcribe_arrays(model, processor, [clip], **kwargs)[0]


def test_cli_joint_ctc_head_candidates_without_joint_decoding_is_refused(build, tmp_path, capsys):
    processor, model = build("whisper", "qwen2")
    model.add_ctc_head(list(range(3, 80)), processor.tokenizer.all_special_ids)  # no joint weight saved with it
    folder = save(processor, model, tmp_path / "model")
    path = write_wav(tmp_path / "clip.wav", make_clips((0.9,))[0])
    code = main(["transcribe", str(path), "--model", str(folder), "--joint-ctc-head-candidates", "4", "--quiet"])
    assert code == 2 and "--joint-ctc-head-candidates needs joint CTC decoding" in capsys.readouterr().err


def test_cli_a_negative_number_of_head_candidates_is_refused_at_parse_time(tmp_path, capsys):
    path = write_wav(tmp_path / "clip.wav", make_clips((0.5,))[0])
    with pytest.raises(SystemExit):
        main(["transcribe", str(path), "--model", str(tmp_path / "m"), "--joint-ctc-head-candidates", "-1"])
    assert "--joint-ctc-head-candidates: expected an integer >= 0, got '-1'" in capsys.readouterr().err
