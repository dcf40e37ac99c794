"""Output formats: timestamps, SubRip and WebVTT cues (`speechlm.inference.formats`)."""

from __future__ import annotations

from speechlm.inference.formats import Segment, format_timestamp, segments_to_srt, segments_to_vtt

SEGMENTS = [Segment(0.0, 1.25, "hello there"), Segment(1.5, 2.0, ""), Segment(2.5, 4.0, "general")]


def test_timestamps_are_hours_minutes_seconds_and_rounded_milliseconds():
    assert format_timestamp(0) == "00:00:00.000"
    assert format_timestamp(3661.5) == "01:01:01.500"
    assert format_timestamp(59.9996, ",") == "00:01:00,000"


def test_srt_numbers_the_cues_and_leaves_out_empty_segments():
    assert segments_to_srt(SEGMENTS) == (
        "1\n00:00:00,000 --> 00:00:01,250\nhello there\n\n2\n00:00:02,500 --> 00:00:04,000\ngeneral\n\n"
    )


def test_vtt_has_its_header_and_leaves_out_empty_segments():
    assert segments_to_vtt(SEGMENTS) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.250\nhello there\n\n00:00:02.500 --> 00:00:04.000\ngeneral\n\n"
    )
