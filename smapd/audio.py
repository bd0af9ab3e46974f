"""Decode any audio FFmpeg reads to 16 kHz mono, and level quiet speech (chunking.py cuts it).

Decoding streams through PyAV into one int16 buffer (2 bytes a sample: a 3-hour file is 345 MB,
a quarter of float32 audio held twice); chunks are converted to float32 one at a time.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smapd.errors import PermanentJobError
from smapd.models import AudioInfo

RATE = 16000


@dataclass(frozen=True)
class Decoded:
    """16 kHz mono int16 samples and what the container said about them."""

    samples: np.ndarray
    info: AudioInfo
    warning: str | None = None  # decoding stopped early (truncated / corrupt tail)

    def int16(self, start: float, end: float) -> np.ndarray:
        """The samples between two times (seconds), as they are (a view)."""
        return self.samples[int(start * RATE):int(end * RATE)]

    def float32(self, start: float, end: float) -> np.ndarray:
        """The samples between two times (seconds) as float32 in [-1, 1]."""
        return self.int16(start, end).astype(np.float32) / 32768.0


def _open_error(path: Path, e: Exception) -> PermanentJobError:
    text = getattr(e, "strerror", None) or str(e)
    return PermanentJobError(f"not a readable audio or video file (FFmpeg: {text})")


def check_file(path: Path) -> int:
    """The size of ``path`` if it is a regular file we can read; never opens a FIFO or a device.

    Raises:
        PermanentJobError: missing, not a regular file, or unreadable.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PermanentJobError("no such file") from None
    except OSError as e:
        raise PermanentJobError(f"cannot read the file ({e.strerror})") from e
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        raise PermanentJobError(f"is {kind}, not a regular file")
    size = st.st_size
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise PermanentJobError("permission denied (cannot read the file)") from None
    except OSError as e:
        raise PermanentJobError(f"cannot read the file ({e.strerror})") from e
    return size


def decode(path: Path, *, max_seconds: float = float("inf")) -> Decoded:
    """Decode ``path`` to 16 kHz mono int16.

    Raises:
        PermanentJobError: the file is missing, unreadable, empty, not media, has no audio track,
            has no samples, or is longer than ``max_seconds``.
    """
    import av  # PyAV ships with faster-whisper; imported here so the CLI starts fast

    size = check_file(path)
    if size == 0:
        raise PermanentJobError("the file is empty (0 bytes)")

    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.FFmpegError as e:
        raise _open_error(path, e) from e
    except (OSError, ValueError) as e:
        raise _open_error(path, e) from e
    with container:
        if not container.streams.audio:
            kinds: list[str] = sorted({str(s.type) for s in container.streams}) or ["none"]
            raise PermanentJobError(f"the file has no audio track (streams: {', '.join(kinds)})")
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        info = AudioInfo(duration=0.0, sample_rate=int(ctx.sample_rate or 0), channels=int(ctx.channels or 0),
                         codec=str(ctx.name), container=str(container.format.name))
        # Pre-size the buffer from the headers' claim, capped: a tiny file may claim days.
        declared = _declared_seconds(stream, container)
        cap = min(declared if declared > 0 else 600.0, max_seconds if max_seconds < float("inf") else 4 * 3600)
        buf = np.empty(int(cap * RATE) + RATE, dtype=np.int16)
        n = 0
        warning = None
        limit = int(max_seconds * RATE) if max_seconds < float("inf") else None
        # Already 16 kHz mono int16 (a WAV as smapd writes them): taken as it is. Resampling each
        # 64 ms PCM frame cost ~0.7 s of CPU per 400 s of audio, 6x the decoding itself.
        as_is = ctx.format is not None and ctx.format.name == "s16" and ctx.sample_rate == RATE and ctx.channels == 1
        resampler = None if as_is else av.AudioResampler(format="s16", layout="mono", rate=RATE)

        def put(frames: list) -> None:
            nonlocal buf, n
            for f in frames:
                arr = f.to_ndarray().reshape(-1)
                if n + len(arr) > len(buf):
                    grown = np.empty(max(len(buf) * 2, n + len(arr)), dtype=np.int16)
                    grown[:n] = buf[:n]
                    buf = grown
                buf[n:n + len(arr)] = arr
                n += len(arr)

        try:
            for frame in container.decode(stream):
                put(resampler.resample(frame) if resampler else [frame])
                if limit is not None and n > limit:
                    raise PermanentJobError(
                        f"the audio is longer than SMAPD_MAX_DURATION_SECONDS={max_seconds:g} s")
            if resampler:
                put(resampler.resample(None))
        except PermanentJobError:
            raise
        except (av.FFmpegError, ValueError, OSError) as e:
            # Truncated or corrupt tail: keep what decoded, say so in the report.
            warning = f"decoding stopped at {n / RATE:.1f} s: {e}"
        if n == 0:
            if warning:
                raise PermanentJobError(f"no audio could be decoded ({warning.split(': ', 1)[1]})")
            raise PermanentJobError("the file contains no audio samples")
        if warning is None and declared and n / RATE < declared - max(1.0, 0.1 * declared):
            # A cut MP3 ends cleanly where its bytes end; only its header says there was more.
            warning = f"decoding stopped at {n / RATE:.1f} s, but the file declares {declared:.1f} s (cut short?)"
    samples = buf[:n] if n > len(buf) // 2 else buf[:n].copy()
    if not samples.flags.writeable:
        samples = samples.copy()
    info = AudioInfo(duration=n / RATE, sample_rate=info.sample_rate, channels=info.channels,
                     codec=info.codec, container=info.container)
    return Decoded(samples=samples, info=info, warning=warning)


def _declared_seconds(stream: Any, container: Any) -> float:
    """The audio track's length as the file's headers state it (0.0 when they do not)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return float(container.duration) / 1e6 if container.duration else 0.0


# --- loudness ----------------------------------------------------------------------------------

def level_speech(samples: np.ndarray, *, target: float = 0.05, max_gain: float = 50.0,
                 window: float = 0.1, hold: float = 0.75) -> None:
    """Raise quiet stretches towards ``target`` RMS, in place (never lowers anything).

    Whisper's log-mel features keep only 80 dB below the loudest point of a 30 s window, and
    Silero scores quiet speech after loud speech low: a soft voice next to a loud one (a quiet
    clip at -60 dBFS beside one at -27 dBFS, measured on our test clips) vanished from both. The
    gain follows a slow envelope (the loudest 0.1 s frame within +-``hold`` s) so it never pumps
    inside a word, and is capped at ``max_gain`` (34 dB) so near-silence stays near-silent.
    """
    step = int(window * RATE)
    n = len(samples) // step
    if n == 0:
        return
    block = step * 600  # one minute at a time: never a float copy of the whole file
    rms = np.empty(n, dtype=np.float32)
    for i in range(0, n, 600):
        frames = samples[i * step:min(n, i + 600) * step].astype(np.float32) / 32768.0
        rms[i:i + len(frames) // step] = np.sqrt(np.mean(frames.reshape(-1, step) ** 2, axis=1))
    k = max(1, int(hold / window))
    padded = np.pad(rms, k, mode="edge")
    envelope = np.lib.stride_tricks.sliding_window_view(padded, 2 * k + 1).max(axis=1)
    gain = np.clip(target / np.maximum(envelope, 1e-9), 1.0, max_gain).astype(np.float32)
    if np.all(gain <= 1.0001):
        return
    centers = (np.arange(n) + 0.5) * step
    for start in range(0, len(samples), block):
        part = samples[start:start + block]
        # positions as float64: a float32 arange from 2**24 samples on (17.5 min) repeats its start
        g = np.interp(np.arange(start, start + len(part), dtype=np.float64), centers, gain).astype(np.float32)
        samples[start:start + len(part)] = np.clip(part.astype(np.float32) * g, -32768, 32767).astype(np.int16)
