"""`speechlm evaluate`: printed WER and tasks, skipped lines counted, the normaliser named, errors before loading."""

from __future__ import annotations

import json

import torch

from speechlm import cli


def test_speechlm_evaluate_prints_wer_and_counts_skipped_lines(build, manifest, tmp_path, capsys):
    processor, model = build("wav2vec2-layer", "qwen2", dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    with open(manifest, "a") as handle:
        handle.write('{"audio": "missing.wav", "text": "gone"}\n')
    argv = ["evaluate", str(manifest), "--model", str(tmp_path / "model"), "--max-new-tokens", "3", "--quiet"]
    assert cli.main(argv) == 2
    assert "eval.jsonl:4: audio file not found" in capsys.readouterr().err
    assert cli.main([*argv, "--on-error", "skip", "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "WER: " in out and "| Utterances | 3 |" in out and "| n_skipped | 1 |" in out
    assert (tmp_path / "out" / "predictions.jsonl").is_file()


def test_speechlm_evaluate_prints_each_task(build, two_task_manifest, tmp_path, capsys):
    processor, model = build("wav2vec2-layer", "qwen2", dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    argv = ["evaluate", str(two_task_manifest), "--model", str(tmp_path / "model"), "--max-new-tokens", "3", "--quiet",
            "--task-prompt", "slu=intent as json"]  # fmt: skip
    assert cli.main(argv) == 2  # the transcribe task has no prompt: said before the model loads
    assert "task 'transcribe' has no prompt" in capsys.readouterr().err
    assert cli.main([*argv, "--task-prompt", "transcribe=transcribe", "--task-metric", "slu=answer"]) == 0
    out = capsys.readouterr().out
    assert "WER: " in out and "slu (answer): Exact match: " in out and "### Task transcribe (transcription)" in out


def test_speechlm_evaluate_refuses_an_unusable_task_schema_before_loading(two_task_manifest, tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"type": "objekt"}')
    argv = ["evaluate", str(two_task_manifest), "--model", str(tmp_path / "no-model"), "--quiet",
            "--task-prompt", "slu=intent as json", "--task-prompt", "transcribe=transcribe"]  # fmt: skip
    for schema, message in (("missing.json", "No such file"), ("bad.json", "not usable: Invalid type: objekt")):
        assert cli.main([*argv, "--task-schema", f"slu={tmp_path / schema}"]) == 2
        assert f"--task-schema slu: {tmp_path / schema}: " in (err := capsys.readouterr().err) and message in err


def test_speechlm_evaluate_names_the_whisper_normaliser(build, manifest, tmp_path, capsys):
    processor, model = build("wav2vec2-layer", "qwen2", dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "spelling.json").write_text(json.dumps({"mum": "mom"}))
    argv = ["evaluate", str(manifest), "--model", str(tmp_path / "model"), "--max-new-tokens", "3", "--quiet",
            "--normalizer", "whisper", "--whisper-spelling", str(tmp_path / "spelling.json"),
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    assert cli.main(argv) == 0
    assert "- Normaliser: Whisper EnglishTextNormalizer" in capsys.readouterr().out
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"- Model: {tmp_path / 'model'}" in summary and "Normaliser: Whisper EnglishTextNormalizer" in summary


def test_speechlm_evaluate_refuses_joint_ctc_decoding_without_a_ctc_head(build, manifest, tmp_path, capsys):
    processor, model = build("wav2vec2-layer", "qwen2", dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    argv = ["evaluate", str(manifest), "--model", str(tmp_path / "model"), "--joint-ctc-weight", "0.5", "--quiet"]
    assert cli.main(argv) == 2
    assert "--joint-ctc-weight needs a model with a CTC head" in capsys.readouterr().err


def test_speechlm_evaluate_decodes_with_the_joint_ctc_weight_saved_with_the_models_head(build, manifest, tmp_path):
    processor, model = build("whisper", "qwen2", dtype=torch.float32)
    model.add_ctc_head(list(range(3, 80)), processor.tokenizer.all_special_ids)
    model.config.ctc_head["joint_weight"] = 0.5  # as the demo saves its models
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")

    def predictions(*flags: str) -> list[str]:
        out = tmp_path / f"out{len(flags)}{'-'.join(flags)}"
        argv = ["evaluate", str(manifest), "--model", str(tmp_path / "model"), "--max-new-tokens", "6", "--quiet",
                "--output-dir", str(out), *flags]  # fmt: skip
        assert cli.main(argv) == 0
        return [json.loads(line)["hyp"] for line in (out / "predictions.jsonl").read_text().splitlines()]

    assert predictions() == predictions("--joint-ctc-weight", "0.5") != predictions("--joint-ctc-weight", "0")


def test_speechlm_evaluate_refuses_prefer_quoted_without_a_quoting_schema_before_loading(two_task_manifest, tmp_path,
                                                                                        capsys):
    (tmp_path / "plain.json").write_text('{"type": "object"}')
    argv = ["evaluate", str(two_task_manifest), "--model", str(tmp_path / "no-model"), "--quiet", "--prefer-quoted",
            "--task-prompt", "slu=intent as json", "--task-prompt", "transcribe=transcribe"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "--prefer-quoted needs a --task-schema whose schema quotes" in capsys.readouterr().err
    assert cli.main([*argv, "--task-schema", f"slu={tmp_path / 'plain.json'}"]) == 2
    assert "x-speechlm-words-from'); none does" in capsys.readouterr().err


def test_speechlm_evaluate_refuses_prefer_quoted_without_beams(build, two_task_manifest, tmp_path, capsys):
    from tests.inference.test_structured import ROT

    processor, model = build("whisper", "qwen2", dtype=torch.float32)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "rot.json").write_text(json.dumps(ROT))
    argv = ["evaluate", str(two_task_manifest), "--model", str(tmp_path / "model"), "--quiet", "--prefer-quoted",
            "--task-schema", f"slu={tmp_path / 'rot.json'}", "--task-prompt", "slu=intent as json",
            "--task-prompt", "transcribe=transcribe", "--num-beams", "1"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "--prefer-quoted chooses among beams: give --num-beams >= 2" in capsys.readouterr().err
