"""The demo corpus (speechlm/demo/corpus.py): texts, held-out splits, manifests of rendered audio, cache reuse."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from speechlm.demo import corpus as c
from speechlm.demo import render
from speechlm.demo.system_packages import fortune_files, missing_system_packages
from speechlm.demo.text import WORDS_PATTERN
from speechlm.evaluation.normalizers import normalize_text

WORDS = re.compile(WORDS_PATTERN)  # every manifest text in the demo's one text form


def lines(manifest: Path) -> list[dict]:
    """A manifest's lines as written (audio paths relative to it, the demo's own columns)."""
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
MISSING = missing_system_packages("structured")
needs_packages = pytest.mark.skipif(
    bool(MISSING), reason=f"Debian packages missing: {' '.join(MISSING)} (apt-get install -y {' '.join(MISSING)})"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if MISSING:
        pytest.skip(f"Debian packages missing: {' '.join(MISSING)}")
    return c.build_demo_corpus(tmp_path_factory.mktemp("corpus"), n_train=20, n_test=5, progress=False,
                               uqm_test=False)


@needs_packages
def test_tiny_corpus_audio_matches_manifests(tiny: dict[str, Path]) -> None:
    assert set(tiny) == {"train", "test_synthetic", "test_fortunes", "test_asterisk", "test_librivox", "test_uqm"}
    assert c.manifest_records(tiny["test_uqm"]) == []  # built without the UQM held-out set
    assert c.manifest_records(tiny["test_fortunes"]) == []  # the structured corpus has no fortunes
    for name, manifest in tiny.items():
        if name in ("test_uqm", "test_fortunes"):
            continue
        rows = lines(manifest)
        assert rows and len({r["id"] for r in rows}) == len(rows)
        for row in rows:
            assert not Path(row["audio"]).is_absolute()
            info = sf.info(manifest.parent / row["audio"])
            assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
            assert info.duration == pytest.approx(row["duration"], abs=1e-3)
            assert row["source"] in c.SOURCES and WORDS.fullmatch(row["text"])
    train = lines(tiny["train"])
    assert sum(r["source"] == "synthetic" for r in train) == 20
    assert sum(r["source"] == "asterisk" for r in train) > 300
    assert len(lines(tiny["test_synthetic"])) == 5
    assert 50 <= len(lines(tiny["test_asterisk"])) <= 80
    assert len(lines(tiny["test_librivox"])) == 5
    assert all(Path(r["audio"]).is_file() for r in c.manifest_records(tiny["test_librivox"]))


@needs_packages
def test_tiny_corpus_held_out(tiny: dict[str, Path]) -> None:
    train = lines(tiny["train"])
    test = lines(tiny["test_synthetic"])
    train_voices = {r["voice"] for r in train if r["source"] == "synthetic"}
    test_voices = {r["voice"] for r in test}
    assert not train_voices & test_voices and test_voices <= set(render.voices(held_out=True))
    for name in ("test_synthetic", "test_asterisk"):
        assert not {r["text"] for r in train} & {r["text"] for r in lines(tiny[name])}


@needs_packages
def test_real_transcripts_are_normalised(tiny: dict[str, Path]) -> None:
    rows = [r for r in lines(tiny["train"]) if r["source"] == "asterisk"]
    rows += lines(tiny["test_asterisk"])
    assert all(r["text"] == normalize_text(r["text"], spell_numbers=True) for r in rows)
    assert all(r["duration"] <= c.MAX_PROMPT_SECONDS for r in rows)
    texts = {r["text"] for r in rows}
    assert "please enter your password followed by the pound key" in texts
    librivox = lines(tiny["test_librivox"])
    assert "he was not an ill disposed young man" in {r["text"] for r in librivox}


@pytest.fixture
def no_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any audio rendered or converted from here on fails the test."""

    def no_render(*args: object, **kwargs: object) -> None:
        raise AssertionError("re-rendered a cached corpus")

    monkeypatch.setattr(render, "render", no_render)
    monkeypatch.setattr(render, "convert", no_render)


@needs_packages
def test_cache_is_reused(tiny: dict[str, Path], no_rendering: None) -> None:
    root = tiny["train"].parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert c.build_demo_corpus(root, n_train=20, n_test=5, progress=False, uqm_test=False) == tiny
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


@needs_packages
def test_a_corpus_built_before_the_fortunes_set_gets_it_without_re_rendering(tiny: dict[str, Path], tmp_path: Path,
                                                                              no_rendering: None) -> None:
    # Corpora built before session 50 held the mixed corpus's fortunes in test_synthetic and had no test_fortunes.
    old = tmp_path / "old"
    shutil.copytree(tiny["train"].parent, old)
    grammar = lines(tiny["test_synthetic"])
    fortune = {**grammar[0], "id": "fortune-0", "source": "fortunes", "text": "a penny saved is a penny earned"}
    (old / "test_synthetic.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [*grammar, fortune]))
    (old / "test_fortunes.jsonl").unlink()
    manifests = c.build_demo_corpus(old, n_train=20, n_test=5, progress=False, uqm_test=False)
    assert (lines(manifests["test_synthetic"]), lines(manifests["test_fortunes"])) == (grammar, [fortune])


@needs_packages
def test_changed_parameters_rebuild(tmp_path: Path) -> None:
    c.build_demo_corpus(tmp_path, n_train=3, n_test=2, progress=False)
    manifests = c.build_demo_corpus(tmp_path, n_train=3, n_test=3, progress=False)
    assert len(lines(manifests["test_synthetic"])) == 3
    assert len(list((tmp_path / "audio" / "synthetic" / "test").iterdir())) == 3
    (tmp_path / c.STAMP).unlink()  # an interrupted build leaves no stamp: it is rebuilt, orphans removed
    orphan = tmp_path / "audio" / "synthetic" / "test" / "orphan.wav"
    orphan.write_bytes(b"")
    c.build_demo_corpus(tmp_path, n_train=3, n_test=3, progress=False)
    assert not orphan.exists() and (tmp_path / c.STAMP).is_file()


def test_a_corpus_folder_names_its_optional_settings_in_order() -> None:
    stamp = {"corpus": "mixed", "n_train": 9000, "n_test": 200, "seed": 0, "real_speech": True, "natural_fraction": 0.0,
             "uqm_test": True, "uqm_split": "actors", "open_share": 0.25, "uqm_cut_long": True}
    assert c.corpus_folder(stamp) == "corpus-mixed-9000-200-0-real0-cut-open0.25"


@needs_packages
def test_a_corpus_without_a_root_is_built_in_the_cache_folder_its_stamp_names(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path))
    manifests = c.build_demo_corpus(n_train=3, n_test=2, progress=False, uqm_test=False, voice_perturbation=0.1)
    assert manifests["train"].parent == tmp_path / "demo" / "corpus-structured-3-2-0-vp0.1"


@needs_packages
def test_voice_perturbation_changes_training_clips_only(tmp_path: Path) -> None:
    manifests = c.build_demo_corpus(tmp_path, n_train=6, n_test=3, progress=False, uqm_test=False,
                                    voice_perturbation=0.2)
    train = [row for row in lines(manifests["train"]) if row["source"] == "synthetic"]
    assert len(train) == 6 and all(0.8 <= row["rate_factor"] <= 1.2 for row in train)
    assert not any("rate_factor" in row for row in lines(manifests["test_synthetic"]))


@pytest.mark.skipif(not fortune_files(), reason="Debian package fortunes missing (apt-get install -y fortunes)")
def test_fortune_sentences() -> None:
    sentences = c.fortune_sentences()
    assert len(sentences) > 500
    assert all(4 <= len(s.split()) <= 20 and WORDS.fullmatch(s) for s in sentences)
    train, test = c.split_fortunes(100, 20, seed=0)
    assert len(train) == 100 and len(test) == 20 and not set(train) & set(test)


@pytest.mark.skipif(not fortune_files(), reason="Debian package fortunes missing (apt-get install -y fortunes)")
def test_mixed_corpus_takes_the_open_share_of_training_sentences_from_the_fortunes() -> None:
    train, _ = c._texts("mixed", 40, 10, 0, (), open_share=0.25)
    assert len(train) == 40 and sum(source == "fortunes" for _, source in train) == 10


@pytest.mark.skipif(not fortune_files(), reason="Debian package fortunes missing (apt-get install -y fortunes)")
def test_mixed_corpus_holds_out_the_same_sentences_whatever_the_open_share() -> None:
    _, half = c._texts("mixed", 40, 10, 0, (), open_share=0.5)
    _, quarter = c._texts("mixed", 40, 10, 0, (), open_share=0.25)
    assert quarter == half and sum(source == "fortunes" for _, source in half) == 5


@needs_packages
@pytest.mark.skipif(not fortune_files(), reason="Debian package fortunes missing (apt-get install -y fortunes)")
def test_mixed_corpus_holds_out_grammar_and_fortunes_in_a_set_each(tmp_path: Path) -> None:
    # One `WER <set>` line per domain: a set blending both would hide how each is heard.
    manifests = c.build_demo_corpus(tmp_path, corpus="mixed", n_train=4, n_test=4, progress=False, uqm_test=False)
    assert [row["source"] for row in lines(manifests["test_synthetic"])] == ["synthetic"] * 2
    assert [row["source"] for row in lines(manifests["test_fortunes"])] == ["fortunes"] * 2
