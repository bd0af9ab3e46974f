"""The engine's own logic on hand-made words and VAD spans (no model): which stretch is re-decoded."""
from __future__ import annotations

from smapd.engine import _loop_start, _uncovered_speech
from smapd.models import Word


def _words(*spans: tuple[float, float]) -> list[Word]:
    return [Word(a, b, " w", 0.9) for a, b in spans]


def test_a_decoder_that_stopped_early_gets_one_re_decode_for_everything_after_its_last_word() -> None:
    # words up to 8.3 s; the VAD hears speech at 10-14 and 18-24 s that no word covers
    words = _words((0.5, 2.0), (2.1, 4.0), (6.0, 8.3))
    speech = ((0.4, 4.1), (5.9, 8.4), (10.0, 14.0), (18.0, 24.0))
    assert _uncovered_speech(words, speech, 25.0) == (9.7, 25.0)  # from 0.3 s before it to the end


def test_skipped_sentences_with_words_between_them_are_re_decoded_one_at_a_time_longest_first() -> None:
    words = _words((0.5, 3.0), (9.0, 11.0), (20.0, 22.0))
    speech = ((0.5, 3.0), (4.0, 7.5), (9.0, 11.0), (12.0, 19.0), (20.0, 22.0))
    a, b = _uncovered_speech(words, speech, 23.0)
    assert (a, b) == (11.7, 20.0)  # 12-19 (7 s) before 4-7.5 (3.5 s), up to the next word


def test_less_than_a_second_of_uncovered_speech_is_not_worth_a_window() -> None:
    words = _words((0.5, 3.0), (3.5, 8.0))
    assert _uncovered_speech(words, ((0.5, 8.0), (9.0, 9.8)), 10.0) is None
    assert _uncovered_speech(words, ((0.5, 8.0), (9.0, 10.0)), 10.0) == (8.7, 10.0)
    assert _uncovered_speech([], (), 10.0) is None


def test_a_loop_that_every_fallback_repeats_is_cut_where_it_starts_to_repeat() -> None:
    text = [11, 12, 13]
    assert _loop_start(text + [7, 8] * 12 + [4]) == 5  # "... or, or, or, ..." keeps one "or,"
    assert _loop_start([5] * 20) == 1
    assert _loop_start(list(range(40))) is None
    assert _loop_start(text + [7, 8] * 4 + text) is None  # said four times is speech, not a loop
