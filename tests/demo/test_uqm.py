"""The Ur-Quan Masters voice acting as real-speech data (speechlm/demo/uqm.py), on small zips made here."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pytest
import soundfile as sf

from speechlm.demo import uqm
from speechlm.demo.render import RenderJob, render

SCRIPT = """#(HELLO_1)\tmelnorme-000.ogg
I am Trade Master Greenish.
We have *parties* -- 3 of them!

#(how_know)
How did you know about us?

#(KNOW_BECAUSE)\tmelnorme-001.ogg
We gather information.
"""


def test_transcripts_join_lines_and_skip_the_players_unvoiced_lines():
    lines = uqm.parse_transcripts(SCRIPT, "melnorme")
    assert [(ln.clip, ln.text) for ln in lines] == [
        ("melnorme-000.ogg", "I am Trade Master Greenish. We have *parties* -- 3 of them!"),
        ("melnorme-001.ogg", "We gather information."),
    ]


def test_clean_transcript_drops_stage_marks_and_spells_numbers():
    assert uqm.clean_transcript("We have *parties* -- 3 of them! `Yes.'") == "we have parties three of them yes"


def make_game(root, characters: dict[str, list[float]]):
    """A fake unpacked uqm-voice + uqm-content: one script and one 11,025 Hz Ogg clip per (character, duration)."""
    (root / uqm.VOICE_ZIP).parent.mkdir(parents=True)
    (root / uqm.CONTENT_ZIP).parent.mkdir(parents=True)
    with zipfile.ZipFile(root / uqm.VOICE_ZIP, "w") as voice, zipfile.ZipFile(root / uqm.CONTENT_ZIP, "w") as content:
        for character, durations in characters.items():
            script = []
            for i, seconds in enumerate(durations):
                clip = root / f"{character}-{i:03d}.ogg"
                tone = 0.1 * np.sin(np.arange(int(11025 * seconds)) / 5).astype(np.float32)
                sf.write(clip, tone, 11025, format="OGG", subtype="VORBIS")
                voice.write(clip, f"3dovoice/{character}/{clip.name}")
                script.append(f"#(LINE_{i})\t{clip.name}\nline {i} of {character}\n")  # 4 words
            content.writestr(f"base/comm/{character}/{character}.txt", "\n".join(script))


def test_reserved_characters_are_never_read(tmp_path):
    make_game(tmp_path, {"syreen": [1.0], "spathi": [1.0], "shofixti": [1.0], "melnorme": [1.0]})
    assert {line.character for line in uqm.voiced_lines(tmp_path)} == {"melnorme"}


def test_characters_voiced_by_a_reserved_characters_actor_are_never_read(tmp_path):
    make_game(tmp_path, {"vux": [1.0], "zoqfotpik": [1.0], "ilwrath": [1.0], "melnorme": [1.0]})
    assert {line.character for line in uqm.voiced_lines(tmp_path)} == {"melnorme"}


def test_split_never_trains_on_a_held_out_characters_actor():
    lines = [uqm.Line(c, f"{c}-000.ogg", "hello") for c in ("starbase", "yehatrebels", "melnorme", "commander")]
    train, _ = uqm.split_lines(lines, held_out=("commander", "yehat"))
    assert [ln.character for ln in train] == ["melnorme"]


def test_split_holds_out_whole_speakers_and_drops_processed_voices():
    lines = [uqm.Line(c, f"{c}-000.ogg", "hello") for c in ("melnorme", "commander", "orz", "yehat")]
    train, test = uqm.split_lines(lines)
    assert [ln.character for ln in train] == ["melnorme"]
    assert [ln.character for ln in test] == ["commander", "yehat"]
    assert "orz" in [ln.character for ln in uqm.split_lines(lines, include_processed=True)[0]]


def test_pico_reads_whole_lines_of_voices_as_people_sound():
    rows = [{"text": "a", "speaker": "melnorme"}, {"text": "b", "speaker": "orz"},
            {"text": "c", "speaker": "melnorme", "cut_from": "melnorme-001"}]
    assert uqm.texts_for_pico(rows) == ["a"]


def test_pico_reads_only_lines_whose_clips_are_not_trained_on():
    lines = [uqm.Line("melnorme", "melnorme-001.ogg", "heard"), uqm.Line("melnorme", "melnorme-002.ogg", "cut"),
             uqm.Line("orz", "orz-001.ogg", "processed"), uqm.Line("melnorme", "melnorme-003.ogg", "unheard")]
    rows = [{"id": "uqm-melnorme-001"}, {"id": "uqm-melnorme-002-0", "cut_from": "melnorme-002"}]
    assert uqm.unheard_line_pieces(lines, rows) == ["unheard"]


def test_an_unheard_line_is_read_in_pieces_cut_at_its_sentence_ends():
    line = uqm.Line("melnorme", "melnorme-001.ogg", "one two three four five", ("one two", "three", "four five"))
    assert uqm.unheard_line_pieces([line], [], max_words=3) == ["one two three", "four five"]


def test_an_unheard_sentence_longer_than_a_piece_is_cut_between_words():
    line = uqm.Line("melnorme", "melnorme-001.ogg", "one two three four five six seven")
    assert uqm.unheard_line_pieces([line], [], max_words=3) == ["one two three", "four five six", "seven"]


def test_transcripts_that_cannot_fit_their_clip_are_implausible():
    assert uqm.plausible("how nice to see you again captain", 2.5)
    assert not uqm.plausible(" ".join(["word"] * 200), 3.3)  # a whole speech for one sentence's clip
    assert not uqm.plausible("sob", 4.3)  # a sob is not the word


def test_clips_become_16k_wavs_and_long_ones_are_dropped(tmp_path):
    game = tmp_path / "game"
    make_game(game, {"melnorme": [1.5, 20.0]})
    rows = uqm.write_clips(tmp_path / "corpus", uqm.voiced_lines(game), "uqm/train", uqm_root=game)
    assert [row["text"] for row in rows] == ["line zero of melnorme"]
    audio, rate = sf.read(tmp_path / "corpus" / rows[0]["audio"])
    assert rate == 16_000 and abs(len(audio) / rate - 1.5) < 0.01
    assert rows[0]["speaker"] == "melnorme" and rows[0]["source"] == "uqm"


def test_sentences_of_a_line_join_back_into_its_cleaned_text():
    raw = "We have *parties* -- 3 of them! Come in; sit down."
    assert uqm.sentences_of(raw, uqm.clean_transcript(raw)) == ("we have parties", "three of them", "come in",
                                                                "sit down")


SENTENCES = tuple(" ".join([letter * 9] * 4) for letter in "abc")  # 4 words, 40 characters with the space after


def test_a_long_clip_is_cut_in_the_pauses_at_its_sentence_ends():
    # Speech at ~30 characters a second, a 0.4 s pause after each sentence and a 0.2 s one inside the second.
    speech = [(0.0, 1.0), (1.4, 1.9), (2.1, 2.6), (3.0, 4.0)]
    pieces = uqm.cut_at_pauses(SENTENCES, speech, max_seconds=2.0)
    assert [text for _, _, text in pieces] == list(SENTENCES)
    assert [end for _, end, _ in pieces[:-1]] == [1.2, 2.8]  # the pauses' middles, not the gap inside a sentence


def test_a_long_clip_is_cut_only_as_often_as_its_pieces_need():
    speech = [(0.0, 1.0), (1.4, 2.4), (2.8, 3.8)]
    pieces = uqm.cut_at_pauses(SENTENCES, speech, max_seconds=3.0)
    assert len(pieces) == 2 and all(end - start <= 3.0 for start, end, _ in pieces)


def test_a_clip_without_a_pause_where_its_sentences_end_is_not_cut():
    # The only pause falls after a fifth of the text: a cut there would give pieces at the wrong speaking rate.
    speech = [(0.0, 0.6), (1.0, 4.0)]
    assert uqm.cut_at_pauses(SENTENCES, speech, max_seconds=3.5) == []


def test_a_clip_whose_pieces_cannot_fit_is_not_cut():
    speech = [(0.0, 1.0), (1.4, 2.4), (2.8, 3.8)]
    assert uqm.cut_at_pauses(SENTENCES, speech, max_seconds=0.9) == []


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian espeak-ng")
def test_long_clips_are_cut_into_pieces_that_say_their_own_sentences(tmp_path):
    game, spoken = tmp_path / "game", []
    for i, sentence in enumerate(("The ship is ready to leave.", "We gather information about every star.")):
        render(RenderJob(sentence, "en-us", 150, 50, tmp_path / f"{i}.wav"))
        audio, rate = sf.read(tmp_path / f"{i}.wav", dtype="float32")
        spoken += [audio, np.zeros(round(0.6 * rate), dtype=np.float32)]
    clip = game / "melnorme-000.ogg"
    (game / uqm.VOICE_ZIP).parent.mkdir(parents=True)
    (game / uqm.CONTENT_ZIP).parent.mkdir(parents=True)
    sf.write(clip, np.concatenate(spoken), rate, format="OGG", subtype="VORBIS")
    with zipfile.ZipFile(game / uqm.VOICE_ZIP, "w") as voice, zipfile.ZipFile(game / uqm.CONTENT_ZIP, "w") as content:
        voice.write(clip, f"3dovoice/melnorme/{clip.name}")
        content.writestr("base/comm/melnorme/melnorme.txt", "#(HELLO)\tmelnorme-000.ogg\nThe ship is ready to "
                         "leave. We gather information about every star.\n")
    seconds = sum(len(part) for part in spoken) / rate
    rows = uqm.write_clips(tmp_path / "corpus", uqm.voiced_lines(game), "uqm/train", max_seconds=seconds * 0.7,
                           uqm_root=game, cut_long=True)
    assert [row["text"] for row in rows] == ["the ship is ready to leave", "we gather information about every star"]
    assert all(row["duration"] <= seconds * 0.7 and row["cut_from"] == "melnorme-000" for row in rows)
