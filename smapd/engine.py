"""Engines turn one chunk of 16 kHz audio into segments (times relative to the chunk).

``FasterWhisperEngine`` decodes each chunk as ONE 30 s Whisper window without timestamp tokens
(the fastest mode, and the most accurate on silence-cut chunks), then aligns the words to the
audio with Whisper's cross-attention (one extra decoder pass, ~5% of the chunk's time), so the
subtitles still get word-accurate cue times. Measured on a 28 s chunk, 1 thread, base int8:
no timestamps 1.5 s, timestamp tokens 2.3 s, timestamp tokens + words 2.7 s, this way 1.6 s.

``CommandEngine`` runs an external recognizer per chunk from a template such as SMAP's
``whisper-cli -m {model} -f {input} -otxt -of {output_base}``, in its own process group.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from smapd.errors import ChunkError, ChunkTimeout, ConfigError
from smapd.models import Segment, Word

_SENTENCE_END = (".", "?", "!", "。", "？", "！")
_PREPEND = "\"'“¿([{-"
_APPEND = "\"'.。,，!！?？:：”)]}、"


@dataclass(frozen=True)
class DecodeOptions:
    """What a chunk is decoded with; the same for every chunk of a file."""

    language: str | None = None  # None: detect (only used when no file-level language is known)
    task: str = "transcribe"
    beam_size: int = 5
    initial_prompt: str | None = None  # issue 11: text the decoder sees as if it came before the chunk
    hotwords: str | None = None  # issue 11: words to favour (faster-whisper's hotwords prompt)


@dataclass(frozen=True)
class EngineSpec:
    """Everything a worker process needs to build its engine. Picklable."""

    kind: str  # "faster-whisper" | "command"
    model: str  # a directory or a model name
    device: str = "cpu"
    compute_type: str = "int8"
    cpu_threads: int = 1
    command: str = ""
    download_root: str | None = None


class Engine(Protocol):
    def transcribe(self, audio: np.ndarray, options: DecodeOptions) -> list[Segment]: ...

    def detect_language(self, audio: np.ndarray) -> tuple[str, float]: ...


def _words_to_segments(words: list[Word], fallback_text: str, duration: float) -> list[Segment]:
    """Group aligned words into sentence segments."""
    if not words:
        text = fallback_text.strip()
        return [Segment(0.0, duration, text)] if text else []
    segments: list[Segment] = []
    current: list[Word] = []
    for w in words:
        current.append(w)
        if w.text.strip().endswith(_SENTENCE_END):
            segments.append(Segment(current[0].start, current[-1].end, "".join(x.text for x in current).strip(),
                                    tuple(current)))
            current = []
    if current:
        segments.append(Segment(current[0].start, current[-1].end, "".join(x.text for x in current).strip(),
                                tuple(current)))
    return segments


class FasterWhisperEngine:
    """Whisper through CTranslate2, one 30 s window per chunk. Build once per worker process."""

    def __init__(self, spec: EngineSpec) -> None:
        from faster_whisper import WhisperModel

        try:
            self.model = WhisperModel(spec.model, device=spec.device, compute_type=spec.compute_type,
                                      cpu_threads=spec.cpu_threads, num_workers=1,
                                      download_root=spec.download_root, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - CTranslate2 raises RuntimeError/ValueError freely
            raise ConfigError(f"cannot load the Whisper model {spec.model!r}: {e}") from e

    def _encode(self, audio: np.ndarray) -> tuple[Any, int]:
        from faster_whisper.audio import pad_or_trim

        features = self.model.feature_extractor(audio)
        frames = min(features.shape[-1], self.model.feature_extractor.nb_max_frames)
        return self.model.encode(pad_or_trim(features)), frames

    def detect_language(self, audio: np.ndarray) -> tuple[str, float]:
        encoder_output, _ = self._encode(audio)
        token, prob = self.model.model.detect_language(encoder_output)[0][0]
        return token[2:-2], float(prob)

    def transcribe(self, audio: np.ndarray, options: DecodeOptions,
                   speech: tuple[tuple[float, float], ...] = ()) -> list[Segment]:
        """Decode one chunk; ``speech`` (chunk-relative VAD spans) lets us catch a decoder that stops early.

        Without timestamp tokens Whisper sometimes ends its output at a long pause and drops the
        rest of the window (or skips a sentence). Where the VAD hears >= 1 s of speech that no
        aligned word covers, that stretch is decoded again as its own window (at most twice).
        """
        duration = len(audio) / 16000
        self.detected: tuple[str, float] | None = None
        words, text, language = self._decode_window(audio, options, options.language)
        texts = [text]
        for _ in range(2):
            gap = _uncovered_speech(words, speech, duration)
            if gap is None:
                break
            a, b = gap
            part, text, language = self._decode_window(audio[int(a * 16000):int(b * 16000)], options, language)
            part = [Word(round(w.start + a, 3), round(min(w.end + a, b), 3), w.text, w.probability) for w in part]
            if not part:
                break
            words = sorted([w for w in words if w.end <= a or w.start >= b] + part, key=lambda w: w.start)
            texts.append(text)
        return _words_to_segments(_clamp_long_words(words), " ".join(texts), duration)

    def _decode_window(self, audio: np.ndarray, options: DecodeOptions,
                       language: str | None) -> tuple[list[Word], str, str]:
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens, merge_punctuations

        encoder_output, frames = self._encode(audio)
        if language is None:  # detect from the encoder pass we need anyway
            token, prob = self.model.model.detect_language(encoder_output)[0][0]
            language = token[2:-2]
            self.detected = (language, round(float(prob), 4))
        tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual,
                              task=options.task, language=language)
        # issue 11: an initial prompt is encoded as previous tokens, as faster-whisper's transcribe does
        previous = tokenizer.encode(" " + options.initial_prompt.strip()) if options.initial_prompt else []
        prompt = self.model.get_prompt(tokenizer, previous, without_timestamps=True, hotwords=options.hotwords)
        suppress = get_suppressed_tokens(tokenizer, (-1,))
        best: tuple[float, list[int]] | None = None
        # Whisper's temperature fallback: re-decode when the text loops or is improbable.
        for temperature in (0.0, 0.4, 0.8):  # Whisper's ladder, thinned: each rung is a full decode
            sampling = {"beam_size": options.beam_size, "patience": 1.0} if temperature == 0 else {
                "beam_size": 1, "sampling_topk": 0, "sampling_temperature": temperature}
            result = self.model.model.generate(
                encoder_output, [prompt], max_length=448, return_scores=True, return_no_speech_prob=True,
                suppress_blank=True, suppress_tokens=suppress, **sampling)[0]
            tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
            avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
            if result.no_speech_prob > 0.6 and avg_logprob < -1.0:
                return [], "", language  # Whisper's own silence rule: no speech, say nothing
            looping = get_compression_ratio(tokenizer.decode(tokens).strip()) > 2.4
            if best is None or (not looping and avg_logprob > best[0]):
                best = (avg_logprob if not looping else -1e9, tokens)
            if not looping and avg_logprob >= -1.0:
                break
        assert best is not None
        tokens = best[1]
        if not tokens:
            return [], "", language
        duration = len(audio) / 16000
        alignment = self.model.find_alignment(tokenizer, [tokens], encoder_output, frames)[0]
        merge_punctuations(alignment, _PREPEND, _APPEND)
        words = [Word(round(float(a["start"]), 3), round(float(min(a["end"], duration)), 3), a["word"],
                      round(float(a["probability"]), 3))
                 for a in alignment if a["word"]]
        return words, tokenizer.decode(tokens), language


def _uncovered_speech(words: list[Word], speech: tuple[tuple[float, float], ...],
                      duration: float) -> tuple[float, float] | None:
    """The longest stretch of VAD speech (>= 1 s) that no word covers, widened to word boundaries."""
    covered = [(w.start - 0.4, w.end + 0.4) for w in words]
    best: tuple[float, float] | None = None
    for s, e in speech:
        t = s
        for cs, ce in covered:  # words are in time order
            if ce <= t or cs >= e:
                continue
            if cs > t and (best is None or cs - t > best[1] - best[0]):
                best = (t, cs)
            t = max(t, ce)
        if e > t and (best is None or e - t > best[1] - best[0]):
            best = (t, e)
    if best is None or best[1] - best[0] < 1.0:
        return None
    before = [w.end for w in words if w.end <= best[0] + 0.4]
    after = [w.start for w in words if w.start >= best[1] - 0.4]
    return (max(before[-1] if before else 0.0, best[0] - 0.3), min(after[0] if after else duration, duration))


def _clamp_long_words(words: list[Word]) -> list[Word]:
    """Cross-attention gives a word after a long pause the whole pause; cut such words down."""
    durations = [w.end - w.start for w in words if w.end > w.start]
    if not durations:
        return words
    limit = 2 * min(0.7, float(np.median(durations))) + 0.5
    out = []
    for w in words:
        if w.end - w.start > limit:
            w = Word(round(w.end - limit, 3), w.end, w.text, w.probability)
        out.append(w)
    return out


def write_wav(path: Path, audio: np.ndarray) -> None:
    """16 kHz mono 16-bit WAV, what whisper.cpp and pocketsphinx both read."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (it leads its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class CommandEngine:
    """An external program per chunk. ``{model}``, ``{input}``, ``{output_base}``, ``{language}``,
    ``{threads}`` in the template are filled in per chunk (after shell-style splitting, so paths
    with spaces stay one argument); the program must write ``{output_base}.txt``."""

    def __init__(self, spec: EngineSpec) -> None:
        if not spec.command.strip():
            raise ConfigError("SMAPD_ENGINE=command needs SMAPD_COMMAND, e.g. "
                              "'whisper-cli -m {model} -f {input} -otxt -of {output_base}'")
        try:
            self.argv = shlex.split(spec.command)
        except ValueError as e:
            raise ConfigError(f"SMAPD_COMMAND={spec.command!r} is not a valid command line: {e}") from e
        self.spec = spec
        self.proc: subprocess.Popen | None = None

    def terminate(self) -> None:
        """Kill the running program's process group, from any thread (pool shutdown)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def run(self, audio: np.ndarray, options: DecodeOptions, timeout: float) -> list[Segment]:
        """Run the program on one chunk; kill its whole process group at ``timeout``."""
        with tempfile.TemporaryDirectory(prefix="smapd-cmd-") as tmp:
            wav = Path(tmp) / "chunk.wav"
            base = Path(tmp) / "chunk"
            write_wav(wav, audio)
            fields = {"model": self.spec.model, "input": str(wav), "output_base": str(base),
                      "language": options.language or "auto", "threads": str(self.spec.cpu_threads)}
            argv = [arg.format(**fields) for arg in self.argv]
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True)
            except OSError as e:
                raise ChunkError(f"cannot run {argv[0]!r}: {e.strerror}") from e
            self.proc = proc
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                raise ChunkTimeout(f"{argv[0]} ran past CHUNK_TIMEOUT={timeout:g} s and was killed") from None
            finally:
                self.proc = None
                if proc.poll() is None:
                    kill_group(proc)
            tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
            if proc.returncode != 0:
                how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
                       else f"exited with status {proc.returncode}")
                raise ChunkError(f"{argv[0]} {how}" + (f": {tail[0]}" if tail else ""))
            out = base.with_suffix(".txt")
            if not out.is_file():
                raise ChunkError(f"{argv[0]} wrote no {{output_base}}.txt")
            text = " ".join(out.read_text(errors="replace").split())
        return [Segment(0.0, round(len(audio) / 16000, 3), text)] if text else []
