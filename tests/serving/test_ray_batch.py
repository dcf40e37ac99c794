"""Batch transcription on Ray Data (`speechlm.serving.ray_batch`), locally on a small manifest with a tiny model.

Every text is compared with `transcribe_arrays` on the same clip alone; resuming is proven by counts (what was
skipped, what each id has in the output), never by speed. Skips when Ray is not installed.
"""

from __future__ import annotations

import json

import pytest
import soundfile as sf

from speechlm.audio import load_audio
from speechlm.inference import transcribe_arrays
from speechlm.serving.ray_batch import finished_ids, manifest_rows
from tests.conftest import make_clips

TOKENS = 6
SR = 16000


@pytest.fixture(scope="module")
def ray_local():
    pytest.importorskip("ray.data", reason='ray is not installed (pip install -e ".[ray]")')
    import ray
    from ray.data import DataContext

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             configure_logging=False)  # fmt: skip
    DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(build, tmp_path_factory):
    processor, model = build("whisper", "qwen2")
    folder = tmp_path_factory.mktemp("ray-data") / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_corpus(folder, count: int, start: int = 0) -> list[dict]:
    """`count` clips of different lengths as wav files; manifest lines with ids clip-<n>."""
    lines = []
    for n in range(start, start + count):
        clip = make_clips((0.3 + 0.11 * (n % 7),), seed=n)[0]
        sf.write(folder / f"clip-{n}.wav", clip, SR, subtype="FLOAT")
        lines.append({"id": f"clip-{n}", "audio": f"clip-{n}.wav"})
    return lines


def write_manifest(path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def one_by_one(model_dir, folder, ids: list[str]) -> dict[str, str]:
    from speechlm.loading import load_pretrained

    processor, model = load_pretrained(str(model_dir), device="cpu", merge_lora=True)
    return {i: transcribe_arrays(model, processor, [load_audio(folder / f"{i}.wav", SR)], max_new_tokens=TOKENS)[0]
            for i in ids}  # fmt: skip


def read_rows(path) -> list[dict]:
    """The output's rows; a torn line (a crash mid-write) is skipped, as `finished_ids` does."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def test_ray_data_equals_one_by_one_and_resumes(ray_local, model_dir, tmp_path):
    from speechlm.serving.ray_batch import transcribe_dataset

    lines = write_corpus(tmp_path, 10)
    (tmp_path / "notes.wav").write_bytes(b"I am not audio")
    lines.append({"id": "bad", "audio": "notes.wav"})
    manifest, output = tmp_path / "corpus.jsonl", tmp_path / "out" / "results.jsonl"
    write_manifest(manifest, lines)
    options = dict(num_actors=2, batch_size=4, max_new_tokens=TOKENS, num_cpus=0.5, device="cpu", progress=False)

    summary = transcribe_dataset(manifest, model_dir, output, **options)
    assert (summary["transcribed"], summary["failed"], summary["skipped"]) == (10, 1, 0)
    rows = {row["id"]: row for row in read_rows(output)}
    assert len(read_rows(output)) == 11 and set(rows) == {line["id"] for line in lines}
    expected = one_by_one(model_dir, tmp_path, [f"clip-{n}" for n in range(10)])
    assert {i: rows[i]["text"] for i in expected} == expected
    assert "notes.wav" in rows["bad"]["error"] and "text" not in rows["bad"]
    assert rows["clip-3"]["duration"] == pytest.approx(0.3 + 0.11 * 3, abs=1e-3)

    # A crash mid-write leaves a torn line; more clips join the manifest. The rerun decodes only what is missing.
    with open(output, "a") as handle:
        handle.write('{"id": "clip-99", "audio": "torn')
    more = write_corpus(tmp_path, 3, start=10)
    write_manifest(manifest, lines + more)
    summary = transcribe_dataset(manifest, model_dir, output, **options)
    assert (summary["transcribed"], summary["failed"], summary["skipped"]) == (3, 0, 11)
    rows = read_rows(output)  # the torn line is skipped by the reader
    ids = [row["id"] for row in rows]
    assert sorted(ids) == sorted(line["id"] for line in lines + more)  # every id exactly once
    expected = one_by_one(model_dir, tmp_path, [line["id"] for line in more])
    assert {row["id"]: row["text"] for row in rows if row["id"] in expected} == expected

    # Nothing left: no Ray work at all. retry_errors decodes the bad file again (and it fails again, clearly).
    assert transcribe_dataset(manifest, model_dir, output, **options)["skipped"] == 14
    summary = transcribe_dataset(manifest, model_dir, output, retry_errors=True, **options)
    assert (summary["transcribed"], summary["failed"], summary["skipped"]) == (0, 1, 13)


def test_manifest_rows_and_finished_ids(tmp_path):
    write_manifest(tmp_path / "m.jsonl", [{"audio": "a.wav"}, {"id": 7, "audio": "b.wav"}])
    (tmp_path / "m.jsonl").write_text((tmp_path / "m.jsonl").read_text() + "not json\n")
    rows, problems = manifest_rows(tmp_path / "m.jsonl")
    assert [row["id"] for row in rows] == [str(tmp_path / "a.wav"), "7"] and len(problems) == 1
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "7", "text": "x"}\n{"id": "8", "error": "bad"}\n{"id": "9", "te')
    assert finished_ids(out) == {"7", "8"} and finished_ids(out, retry_errors=True) == {"7"}
    assert finished_ids(tmp_path / "missing.jsonl") == set()
