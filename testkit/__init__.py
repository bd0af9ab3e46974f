"""The test kit: everything tests and benches need to judge smapd from the outside.

- :mod:`testkit.paths`: the repository, tests/data, tests/tools, the shared speech clips;
- :mod:`testkit.env`: the one environment builder (one scrub list) for smapd subprocesses;
- :mod:`testkit.node`: :class:`Node`, a restartable real `smapd run`;
- :mod:`testkit.notify`: :class:`NotifySocket`, what a daemon tells systemd;
- :mod:`testkit.spoolview`: :class:`SpoolView`, a spool seen from outside, and :func:`parse_name`;
- :mod:`testkit.invariants`: :func:`check_spool`, DESIGN.md §1 over a spool;
- :mod:`testkit.systemd`: a real systemd as PID 1 of private namespaces, for the deploy tests;
- :mod:`testkit.media`, :mod:`testkit.text`, :mod:`testkit.procs`: audio fixtures and long-form
  recordings, WER and subtitle parsing, waits and process helpers.

It imports smapd nowhere, so a bug in smapd cannot hide itself in the judge. The names below are
re-exported so tests can write ``import testkit as tk`` and ``tk.wait_for(...)``.
"""
from __future__ import annotations

from testkit.env import DAEMON_DEFAULTS, daemon_env, scrubbed, smapd_env
from testkit.invariants import Findings, Seen, assert_invariants, check_spool
from testkit.media import (
    RATE,
    SAMPLE_FORMATS,
    SHORT_CLIP,
    Longform,
    audio_info,
    decode_pcm16,
    encode_audio,
    make_longform,
    manifest_clips,
    read_manifest,
    reference_text,
    room_tone_of,
    speech_bounds,
    write_empty,
    write_long_silence_flac,
    write_noise_wav,
    write_pcm16_wav,
    write_random_bytes,
    write_silence_wav,
    write_speech_variant,
    write_text_as,
    write_truncated_copy,
    write_video_without_audio,
    write_wav,
)
from testkit.node import Node, NodeFailed, kill_all, serve
from testkit.notify import Notice, NotifySocket
from testkit.paths import DATA_DIR, REPO, TOOLS_DIR, speech_dir
from testkit.procs import children, pid_alive, smapd, wait_for, wait_gone
from testkit.spoolview import Name, Outcome, SpoolView, display, input_name, parse_name
from testkit.text import (
    cue_words_in_span,
    load_json,
    normalize,
    parse_srt,
    parse_vtt,
    wer,
    word_errors,
    word_recall,
)

__all__ = [
    "DAEMON_DEFAULTS", "DATA_DIR", "RATE", "REPO", "SAMPLE_FORMATS", "SHORT_CLIP", "TOOLS_DIR", "Findings", "Longform",
    "Name", "Node", "NodeFailed", "Notice", "NotifySocket", "Outcome", "Seen", "SpoolView", "assert_invariants",
    "audio_info",
    "check_spool", "children", "cue_words_in_span", "daemon_env", "decode_pcm16", "display", "encode_audio",
    "input_name", "kill_all", "load_json", "make_longform", "manifest_clips", "normalize", "parse_name",
    "parse_srt", "parse_vtt", "pid_alive", "read_manifest", "reference_text", "room_tone_of", "scrubbed", "serve", "smapd", "smapd_env",
    "speech_bounds", "speech_dir", "wait_for", "wait_gone", "wer", "word_errors", "word_recall", "write_empty",
    "write_long_silence_flac", "write_noise_wav", "write_pcm16_wav", "write_random_bytes", "write_silence_wav",
    "write_speech_variant", "write_text_as", "write_truncated_copy", "write_video_without_audio", "write_wav",
]
