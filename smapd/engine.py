"""Engines turn one chunk of 16 kHz audio into segments (times relative to the chunk).

``FasterWhisperEngine`` decodes each chunk as ONE 30 s Whisper window without timestamp tokens
(the fastest mode, and the most accurate on silence-cut chunks), then aligns the words to the
audio with Whisper's cross-attention (one extra decoder pass, ~5% of the chunk's time), so the
subtitles still get word-accurate cue times. Measured on a 28 s chunk, 1 thread, base int8:
no timestamps 1.5 s, timestamp tokens 2.3 s, timestamp tokens + words 2.7 s, this way 1.6 s.

``smapd.command.CommandEngine`` runs an external recognizer per chunk instead.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from smapd.errors import ConfigError
from smapd.models import DecodeSignals, Segment, Word

_SENTENCE_END = (".", "?", "!", "。", "？", "！")
_PREPEND = "\"'“¿([{-"
_APPEND = "\"'.。,，!！?？:：”)]}、"


@dataclass(frozen=True)
class DecodeOptions:
    """What a chunk is decoded with."""

    language: str | None = None  # None: detect from the chunk's own encoder pass
    task: str = "transcribe"
    beam_size: int = 5
    # True: ``language`` is only a prior; the chunk's own detection overrides it when it is sure
    # (SWITCH_PROBABILITY, SWITCH_SPEECH_SECONDS), so a recording that changes language is followed.
    follow_language: bool = False
    initial_prompt: str | None = None  # issue 11: text the decoder sees as if it came before the chunk
    hotwords: str | None = None  # issue 11: words to favour (faster-whisper's hotwords prompt)


SWITCH_PROBABILITY = 0.7  # a chunk leaves the file's language only when its detector is this sure...
SWITCH_SPEECH_SECONDS = 3.0  # ... and it has this much speech (short chunks follow the file)
SAMPLING_SEED = 1  # the temperature fallback samples; a fixed seed keeps transcripts reproducible
NO_SPEECH_PROB = 0.6  # Whisper's no_speech_threshold ...
LOGPROB_FLOOR = -1.0  # ... and its logprob_threshold: below it a decode is retried at a higher temperature


@dataclass(frozen=True)
class Transcribed:
    """One chunk's decode: segments (chunk time), the language used, and the decoder's signals."""

    segments: tuple[Segment, ...]
    language: tuple[str, float] | None = None  # decoded in, and the detector's probability for it
    signals: DecodeSignals | None = None


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
    def transcribe(self, audio: np.ndarray, options: DecodeOptions,
                   speech: tuple[tuple[float, float], ...] = ()) -> Transcribed: ...

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
        except Exception as e:
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
                   speech: tuple[tuple[float, float], ...] = ()) -> Transcribed:
        """Decode one chunk; ``speech`` (chunk-relative VAD spans) lets us catch a decoder that stops early.

        Without timestamp tokens Whisper sometimes ends its output at a long pause and drops the
        rest of the window (or skips a sentence). Where the VAD hears >= 1 s of speech that no
        aligned word covers, that stretch is decoded again as its own window (at most twice).
        """
        duration = len(audio) / 16000
        encoder_output, frames = self._encode(audio)
        language = self._language(encoder_output, options, sum(e - s for s, e in speech) if speech else duration)
        words, text, signals = self._decode_window(encoder_output, frames, duration, options, language[0])
        texts = [text]
        windows = 1
        # Whisper judged the whole window to hold no speech (tones, music, noise that the VAD let
        # through): re-decoding a stretch of it on its own only invites invented text.
        for _ in range(0 if _no_speech(signals) else 2):
            # Clamped first: the aligner stretches the few words of a decoder that gave up over the
            # whole window, which would hide the speech it skipped.
            gap = _uncovered_speech(_clamp_long_words(words), speech, duration)
            if gap is None:
                break
            a, b = gap
            part_audio = audio[int(a * 16000):int(b * 16000)]
            part_out, part_frames = self._encode(part_audio)
            part, text, _ = self._decode_window(part_out, part_frames, len(part_audio) / 16000, options, language[0])
            windows += 1
            part = [Word(round(w.start + a, 3), round(min(w.end + a, b), 3), w.text, w.probability) for w in part]
            if not part:
                break
            words = sorted([w for w in words if w.end <= a or w.start >= b] + part, key=lambda w: w.start)
            texts.append(text)
        segments = _words_to_segments(_clamp_long_words(words), " ".join(texts), duration)
        return Transcribed(tuple(segments), language, replace(signals, windows=windows))

    def _language(self, encoder_output: Any, options: DecodeOptions, speech_seconds: float) -> tuple[str, float]:
        """The language to decode in, from the chunk's own encoder pass (one decoder step)."""
        if options.language is not None and not options.follow_language:
            return options.language, 1.0
        ranked = [(token[2:-2], float(p)) for token, p in self.model.model.detect_language(encoder_output)[0]]
        top, p_top = ranked[0]
        prior = options.language
        if prior is None or top == prior or (p_top >= SWITCH_PROBABILITY and speech_seconds >= SWITCH_SPEECH_SECONDS):
            return top, round(p_top, 4)
        return prior, round(dict(ranked).get(prior, 0.0), 4)

    def _decode_window(self, encoder_output: Any, frames: int, duration: float, options: DecodeOptions,
                       language: str) -> tuple[list[Word], str, DecodeSignals]:
        import ctranslate2
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens, merge_punctuations

        tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual,
                              task=options.task, language=language)
        # issue 11: an initial prompt is encoded as previous tokens, as faster-whisper's transcribe does
        previous = tokenizer.encode(" " + options.initial_prompt.strip()) if options.initial_prompt else []
        prompt = self.model.get_prompt(tokenizer, previous, without_timestamps=True, hotwords=options.hotwords)
        suppress = get_suppressed_tokens(tokenizer, (-1,))
        best: tuple[float, list[int], DecodeSignals, bool, int | None] | None = None  # score, tokens, signals, looped, loop start
        # Whisper's temperature fallback, thinned (each rung is a full decode): re-decode when the
        # text loops or is improbable.
        rungs: list[tuple[int, float]] = [(options.beam_size, 0.0), (1, 0.4), (1, 0.8)]
        # Speech runs below ~6 tokens a second: a longer output is a loop, not worth its decoder time.
        max_length = min(448, len(prompt) + 32 + int(10 * duration))
        for beam, temperature in rungs:
            sampling = {"beam_size": beam, "patience": 1.0} if temperature == 0 else {
                "beam_size": 1, "sampling_topk": 0, "sampling_temperature": temperature}
            if temperature:
                ctranslate2.set_random_seed(SAMPLING_SEED)  # the same file gives the same text every run
            result = self.model.model.generate(
                encoder_output, [prompt], max_length=max_length, return_scores=True, return_no_speech_prob=True,
                suppress_blank=True, suppress_tokens=suppress, **sampling)[0]
            tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
            avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
            ratio = get_compression_ratio(tokenizer.decode(tokens).strip()) if tokens else 0.0
            signals = DecodeSignals(avg_logprob=round(avg_logprob, 4), compression_ratio=round(ratio, 3),
                                    no_speech_prob=round(result.no_speech_prob, 4), temperature=temperature,
                                    beam_size=beam)
            if _no_speech(signals):
                return [], "", signals  # Whisper's own silence rule: no speech, say nothing
            loop = _loop_start(tokens)
            looping = ratio > 2.4 or loop is not None
            if best is None or (not looping and (best[3] or avg_logprob > best[0])):
                best = (avg_logprob, tokens, signals, looping, loop)
            if not looping and avg_logprob >= LOGPROB_FLOOR:
                break
        assert best is not None
        _, tokens, signals, looped, loop = best
        # Every rung looped (a voice drowned in echo, music): keep the text before the loop.
        tokens = tokens[:loop] if looped else tokens
        if not tokens:
            return [], "", signals
        alignment = self.model.find_alignment(tokenizer, [tokens], encoder_output, frames)[0]
        merge_punctuations(alignment, _PREPEND, _APPEND)
        words = [Word(round(float(a["start"]), 3), round(float(min(a["end"], duration)), 3), a["word"],
                      round(float(a["probability"]), 3))
                 for a in alignment if a["word"]]
        return words, tokenizer.decode(tokens), signals


def _loop_start(tokens: list[int], times: int = 6, period: int = 8) -> int | None:
    """Where a run of one short token pattern repeated ``times`` times ("r-r-r-r-...", "or, or, or,
    ...") begins to repeat (its pattern said once is kept), or None if there is none.

    Such a loop inside otherwise good text keeps the whole window's compression ratio under
    Whisper's 2.4, so it would be kept; a fallback decode usually gets past it.
    """
    first: int | None = None
    for p in range(1, period + 1):
        run = 0
        for i in range(p, len(tokens)):
            run = run + 1 if tokens[i] == tokens[i - p] else 0
            if run >= max(10, p * (times - 1)):
                first = min(first if first is not None else i, i - run + 1)
                break
    return first


def _no_speech(signals: DecodeSignals) -> bool:
    """Whisper's silence rule: the window probably holds no speech and the text is improbable."""
    return signals.no_speech_prob > NO_SPEECH_PROB and signals.avg_logprob < LOGPROB_FLOOR


def _uncovered_speech(words: list[Word], speech: tuple[tuple[float, float], ...],
                      duration: float) -> tuple[float, float] | None:
    """The stretch of VAD speech that no word covers (>= 1 s in all), widened to word boundaries.

    Uncovered bits with no word between them are one stretch: a decoder that stopped early left
    all of them, and one re-decode from its last word gets them all (each is a full encoder pass).
    Of several such stretches, the one with the most uncovered speech."""
    covered = [(w.start - 0.4, w.end + 0.4) for w in words]
    bits: list[tuple[float, float]] = []  # uncovered speech, in time order
    for s, e in speech:
        t = s
        for cs, ce in covered:  # words are in time order
            if ce <= t or cs >= e:
                continue
            if cs > t:
                bits.append((t, cs))
            t = max(t, ce)
        if e > t:
            bits.append((t, e))
    groups: list[list[tuple[float, float]]] = []
    for a, b in bits:
        if groups and not any(groups[-1][-1][1] <= w.start and w.end <= a for w in words):
            groups[-1].append((a, b))
        else:
            groups.append([(a, b)])
    best = max(groups, key=lambda g: sum(b - a for a, b in g), default=None)
    if best is None or sum(b - a for a, b in best) < 1.0:
        return None
    first, last = best[0][0], best[-1][1]
    before = [w.end for w in words if w.end <= first + 0.4]
    after = [w.start for w in words if w.start >= last - 0.4]
    return (max(before[-1] if before else 0.0, first - 0.3), min(after[0] if after else duration, duration))


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
