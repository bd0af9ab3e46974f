"""Audio for the tests: the clips and their manifest, decoding, long-form recordings and fixture makers.

Nothing here imports smapd: these helpers judge smapd from the outside, so a bug in smapd's own
decoding cannot hide itself in the tests. They need numpy and PyAV (both come with faster-whisper)
and the standard library only.
"""
from __future__ import annotations

import csv
import json
import random
import struct
import wave
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple, cast

import av
import numpy as np

from testkit.paths import DATA_DIR

RATE = 16000
SHORT_CLIP = DATA_DIR / "fleurs-en-003.ogg"  # 5.8 s of speech in Opus: what most daemon tests drop


# --------------------------------------------------------------------------------------------
# The test clips
# --------------------------------------------------------------------------------------------

def read_manifest(path: Path = DATA_DIR / "manifest.tsv") -> list[dict[str, str]]:
    """Rows of a speech manifest (file, seconds, language, source_repo, source_path, reference_text)."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def manifest_clips(language: str = "en", data_dir: Path = DATA_DIR) -> list[tuple[Path, str]]:
    """``(path, reference_text)`` of every clip in ``data_dir``'s manifest in one language."""
    rows = read_manifest(data_dir / "manifest.tsv")
    return [(data_dir / r["file"], r["reference_text"].strip()) for r in rows if r["language"] == language]


def reference_text(clip: Path, data_dir: Path = DATA_DIR) -> str:
    """The manifest's reference text of one clip."""
    return next(r["reference_text"].strip() for r in read_manifest(data_dir / "manifest.tsv") if r["file"] == clip.name)


# --------------------------------------------------------------------------------------------
# Decoding and long-form recordings
# --------------------------------------------------------------------------------------------

def decode_pcm16(path: Path | str, rate: int = RATE) -> np.ndarray:
    """Decode any file PyAV reads to mono int16 at ``rate`` (first audio stream)."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    parts: list[np.ndarray] = []
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                parts.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            parts.append(out.to_ndarray().reshape(-1))
    return np.concatenate(parts).astype(np.int16) if parts else np.zeros(0, dtype=np.int16)


def write_pcm16_wav(path: Path | str, pcm: np.ndarray, rate: int = RATE) -> Path:
    """Write mono int16 samples as a plain 16-bit PCM WAV."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm, dtype="<i2").tobytes())
    return Path(path)


def speech_bounds(pcm: np.ndarray, rate: int = RATE, window: float = 0.025,
                  rel_threshold: float = 0.05) -> tuple[int, int]:
    """``(first, last)`` sample of the audible part of a clip: where the 25 ms RMS first and last exceeds
    5% of the clip's loudest window. Approximate (a soft first consonant may start a little earlier);
    the test clips have 0.0-0.5 s of room noise or silence before and 0.1-0.8 s after their speech.
    """
    x = np.asarray(pcm, dtype=np.float64)
    if not x.size:
        return 0, 0
    w = max(1, int(window * rate))
    rms = np.sqrt(np.convolve(x * x, np.ones(w) / w, mode="same"))
    loud = np.nonzero(rms > rel_threshold * rms.max())[0]
    if not loud.size:
        return 0, 0
    return int(loud[0]), int(loud[-1]) + 1


def room_tone_of(clip: np.ndarray, samples: int) -> np.ndarray:
    """``samples`` of a clip's recorded background: its edges outside :func:`speech_bounds`, played
    forwards then backwards (no click at the seams) as often as needed. 50 ms next to the speech are
    left out (a soft consonant may reach past the bounds); digital silence if under 50 ms remain."""
    lead, trail = speech_bounds(clip)
    margin = RATE // 20
    edges = np.concatenate([clip[trail + margin:], clip[:max(0, lead - margin)]])
    if len(edges) < RATE // 20:
        return np.zeros(samples, dtype=np.int16)
    loop = np.concatenate([edges, edges[::-1]])
    return np.resize(loop, samples).astype(np.int16)


class Longform(NamedTuple):
    """A joined recording: its length in seconds, the reference text and every clip's true span."""

    duration: float
    reference_text: str
    spans: list[dict]


def make_longform(
    clips: Sequence[tuple[Path | str, str]],
    out_wav: Path | str,
    seed: int = 7,
    pause_range: tuple[float, float] = (0.3, 2.5),
    long_pause_range: tuple[float, float] = (4.0, 8.0),
    long_pause_every: int = 7,
    repeat: int = 1,
    target_seconds: float | None = None,
    lead_silence: float = 0.0,
    room_tone: bool = False,
) -> Longform:
    """Join speech clips into one 16 kHz mono WAV with pauses between them.

    The same logic as ../shared/tools/make_longform.py: clips are decoded with PyAV, shuffled, and
    joined with pauses drawn from ``pause_range``; after every ``long_pause_every``-th clip the pause
    is a long silence from ``long_pause_range`` instead, so a chunker has real silences to find.
    With ``room_tone`` a pause is not digital silence but the room it follows: the non-speech edges
    of the clip just played (its recorded background), looped to the pause's length, as in a real
    recording where the microphone stays open between sentences.

    Args:
        clips: ``(path, reference_text)`` pairs, e.g. from :func:`manifest_clips`.
        out_wav: where to write the WAV; ``.txt`` (reference) and ``.json`` (spans) are written next to it.
        seed: makes the order and pauses reproducible.
        pause_range: seconds of silence between clips.
        long_pause_range: seconds of the occasional long silence.
        long_pause_every: every n-th pause is a long one (0 = never).
        repeat: use every clip this many times (each round shuffled anew).
        target_seconds: if given, keep adding clips (from further shuffled rounds) until the recording
            is at least this long; the last round may be partial.
        lead_silence: seconds of silence before the first clip.
        room_tone: fill the pauses with the preceding clip's own background (see above).

    Returns:
        ``Longform(duration, reference_text, spans)``; spans are ``{start, end, file, text,
        speech_start, speech_end}`` dicts in seconds (6 decimals: sample-exact at 16 kHz), in the
        order the clips play. start/end bound the whole clip file; speech_start/speech_end the
        audible speech inside it (see :func:`speech_bounds`; clips carry up to ~0.8 s of near-silence).
    """
    if not clips:
        raise ValueError("make_longform needs at least one clip")
    rng = random.Random(seed)
    decoded = {str(p): decode_pcm16(p) for p, _ in clips}

    def one_round() -> list[tuple[Path | str, str]]:
        order = list(clips)
        rng.shuffle(order)
        return order

    order: list[tuple[Path | str, str]] = []
    for _ in range(max(1, repeat)):
        order += one_round()

    audio: list[np.ndarray] = [np.zeros(int(lead_silence * RATE), dtype=np.int16)]
    texts: list[str] = []
    spans: list[dict] = []
    at = len(audio[0])
    i, planned = 0, len(order)
    while i < planned or (target_seconds is not None and at < target_seconds * RATE):
        if i >= len(order):
            nxt = one_round()
            if len(nxt) > 1 and str(nxt[0][0]) == str(order[-1][0]):
                nxt[0], nxt[-1] = nxt[-1], nxt[0]  # never the same clip twice in a row
            order += nxt
        path, text = order[i]
        clip = decoded[str(path)]
        text = text.strip()
        audio.append(clip)
        texts.append(text)
        lead, trail = speech_bounds(clip)
        spans.append({"start": round(at / RATE, 6), "end": round((at + len(clip)) / RATE, 6),
                      "file": Path(path).name, "text": text,
                      "speech_start": round((at + lead) / RATE, 6),
                      "speech_end": round((at + trail) / RATE, 6)})
        at += len(clip)
        long_pause = long_pause_every > 0 and i % long_pause_every == long_pause_every - 1
        pause = rng.uniform(*long_pause_range) if long_pause else rng.uniform(*pause_range)
        gap = int(pause * RATE)
        audio.append(room_tone_of(clip, gap) if room_tone else np.zeros(gap, dtype=np.int16))
        at += gap
        i += 1

    pcm = np.concatenate(audio)
    out_wav = Path(out_wav)
    write_pcm16_wav(out_wav, pcm)
    reference = " ".join(texts)
    out_wav.with_suffix(".txt").write_text(reference + "\n", encoding="utf-8")
    out_wav.with_suffix(".json").write_text(json.dumps(spans, indent=1, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
    return Longform(len(pcm) / RATE, reference, spans)


# --------------------------------------------------------------------------------------------
# Audio fixture makers
# --------------------------------------------------------------------------------------------

SAMPLE_FORMATS = ("u8", "s16", "s24", "s32", "f32")


def write_wav(path: Path | str, samples: np.ndarray, rate: int = RATE, sample_format: str = "s16") -> Path:
    """Write float samples in [-1, 1] (shape ``(n,)`` or ``(n, channels)``) as a WAV file.

    ``sample_format`` is one of u8, s16, s24, s32 (integer PCM, via the ``wave`` module) or f32
    (IEEE float, WAVE_FORMAT_IEEE_FLOAT with a fact chunk, written by hand: ``wave`` only writes PCM).
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    frames, channels = x.shape
    x = np.clip(x, -1.0, 1.0)
    path = Path(path)
    if sample_format == "f32":
        data = x.astype("<f4").tobytes()
        block = 4 * channels
        fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * block, block, 32)
        fact = struct.pack("<I", frames)
        body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<I", 4) + fact
                + b"data" + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b""))
        path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
        return path
    if sample_format == "u8":
        raw = np.round(x * 127 + 128).astype(np.uint8).tobytes()
        width = 1
    elif sample_format == "s16":
        raw = np.round(x * 32767).astype("<i2").tobytes()
        width = 2
    elif sample_format == "s24":
        ints = np.round(x * 8388607).astype("<i4")
        raw = ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()  # little-endian: drop the top byte
        width = 3
    elif sample_format == "s32":
        raw = np.round(x * 2147483647).astype("<i4").tobytes()
        width = 4
    else:
        raise ValueError(f"sample_format must be one of {SAMPLE_FORMATS}, not {sample_format!r}")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return path


def write_silence_wav(path: Path | str, seconds: float, rate: int = RATE, sample_format: str = "s16") -> Path:
    """Digital silence (all zeros)."""
    return write_wav(path, np.zeros(int(seconds * rate)), rate, sample_format)


def write_noise_wav(path: Path | str, seconds: float, rate: int = RATE, amplitude: float = 0.1,
                    seed: int = 0) -> Path:
    """White noise at ``amplitude`` (peak about 3x that)."""
    rng = np.random.default_rng(seed)
    return write_wav(path, rng.normal(0.0, amplitude, int(seconds * rate)), rate)


def write_speech_variant(src: Path | str, dst: Path | str, rate: int = RATE, channels: int = 1,
                         sample_format: str = "s16") -> Path:
    """Re-write a speech clip as a WAV with any rate, channel count and sample format.

    Channel k carries the speech scaled by 1/(k+1), so downmixing by averaging and picking the first
    channel both keep the words.
    """
    pcm = decode_pcm16(src, rate=rate).astype(np.float64) / 32768.0
    cols = np.stack([pcm / (k + 1) for k in range(channels)], axis=1)
    return write_wav(dst, cols, rate, sample_format)


def encode_audio(src: Path | str, dst: Path | str, codec: str, rate: int = RATE, layout: str = "mono",
                 bit_rate: int | None = None, container_format: str | None = None) -> Path:
    """Transcode ``src`` with PyAV, e.g. ``encode_audio(clip, "x.m4a", "aac")``.

    Uses PyAV's bundled FFmpeg encoders (aac, libmp3lame, libopus, flac, libvorbis where present).
    """
    with av.open(str(src)) as inp, av.open(str(dst), "w", format=container_format) as out:
        stream = cast("av.AudioStream", out.add_stream(codec, rate=rate, layout=layout))  # by codec name
        if bit_rate:
            stream.bit_rate = bit_rate
        fmt = (stream.codec_context.codec.audio_formats or [])[0].name
        resampler = av.AudioResampler(format=fmt, layout=layout, rate=rate,
                                      frame_size=stream.codec_context.frame_size or None)
        for frame in inp.decode(audio=0):
            for res in resampler.resample(frame):
                res.pts = None
                out.mux(stream.encode(res))
        for res in resampler.resample(None):
            res.pts = None
            out.mux(stream.encode(res))
        out.mux(stream.encode(None))
    return Path(dst)


def write_video_without_audio(path: Path | str, seconds: float = 2.0, codec: str = "mpeg4",
                              fps: int = 10, size: tuple[int, int] = (64, 48)) -> Path:
    """A video container (mp4/mkv/webm by suffix) with one video stream and no audio at all."""
    with av.open(str(path), "w") as out:
        stream = cast("av.VideoStream", out.add_stream(codec, rate=fps))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        for i in range(int(seconds * fps)):
            img = np.full((size[1], size[0], 3), (i * 8) % 256, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return Path(path)


# keep: int = a byte count, float = a fraction; both kinds are used, hence the explicit union.
def write_truncated_copy(src: Path | str, dst: Path | str, keep: float | int = 0.5) -> Path:  # noqa: PYI041
    """Copy the first part of ``src``: a fraction (float < 1) or a byte count (int)."""
    data = Path(src).read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else int(keep)
    Path(dst).write_bytes(data[:n])
    return Path(dst)


def write_text_as(path: Path | str, text: str = "This is a shopping list, not audio.\nmilk\neggs\n") -> Path:
    """A plain text file under an audio name (e.g. list.mp3)."""
    Path(path).write_text(text, encoding="utf-8")
    return Path(path)


def write_random_bytes(path: Path | str, size: int = 64 * 1024, seed: int = 0) -> Path:
    """Random bytes under an audio name (e.g. noise.wav): no header at all."""
    Path(path).write_bytes(random.Random(seed).randbytes(size))
    return Path(path)


def write_empty(path: Path | str) -> Path:
    """A zero-byte file."""
    Path(path).write_bytes(b"")
    return Path(path)


def write_long_silence_flac(path: Path | str, seconds: float, rate: int = 8000) -> Path:
    """A long, tiny file (e.g. 3 hours): silent FLAC compresses to a few bytes per frame."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("flac", rate=rate, layout="mono")
        block = rate * 10
        zeros = np.zeros((1, block), dtype=np.int16)
        for i in range(int(np.ceil(seconds * rate / block))):
            n = min(block, int(seconds * rate) - i * block)
            frame = av.AudioFrame.from_ndarray(zeros[:, :n], format="s16", layout="mono")
            frame.sample_rate = rate
            frame.pts = None
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return Path(path)


def audio_info(path: Path | str) -> dict:
    """Codec, rate, channels and duration of the first audio stream, as PyAV sees it (for assertions)."""
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        duration = float(c.duration / av.time_base) if c.duration else None
        return {"codec": s.codec_context.name, "rate": s.rate, "channels": s.channels, "duration": duration}
