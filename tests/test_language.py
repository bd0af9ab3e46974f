"""Recordings that change language: each chunk is decoded in its own language (issue 8, target 4).

Real model, real worker processes, real speech: English clips, then a Spanish block. The pipeline
must follow the change (the old one detected English once and decoded the Spanish as English), and
a forced language must still be obeyed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import testkit as tk
from smapd import pipeline
from smapd.engine import EngineSpec
from smapd.models import ChunkStatus
from smapd.pool import Pool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_languages(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """~70 s of English, 12 s of silence (a long pause always ends a chunk), the Spanish clip twice."""
    work = tmp_path_factory.mktemp("two-languages")
    en = tk.make_longform(tk.manifest_clips("en")[:7], work / "en.wav", seed=3, long_pause_every=0)
    es = tk.make_longform(tk.manifest_clips("es"), work / "es.wav", seed=3, repeat=2, long_pause_every=0)
    pcm = np.concatenate([tk.decode_pcm16(work / "en.wav"), np.zeros(12 * 16000, dtype=np.int16),
                          tk.decode_pcm16(work / "es.wav")])
    path = tk.write_pcm16_wav(work / "two.wav", pcm)
    return path, en.reference_text, es.reference_text


@pytest.fixture(scope="module")
def pool(model_dir: Path) -> Pool:
    with Pool(EngineSpec(kind="faster-whisper", model=str(model_dir)), 2, chunk_timeout=300) as p:
        yield p


def test_each_block_is_decoded_in_its_own_language(two_languages: tuple[Path, str, str], pool: Pool) -> None:
    path, en_text, es_text = two_languages
    transcript = pipeline.run(path, pool, pipeline.PipelineOptions())
    assert all(c.status is ChunkStatus.OK for c in transcript.chunks)
    spoken = [c.language[0] for c in transcript.chunks if c.language]
    assert spoken[0] == "en" and spoken[-1] == "es", spoken
    assert transcript.language == "en"  # more English speech than Spanish
    english = " ".join(s.text for c in transcript.chunks if c.language and c.language[0] == "en" for s in c.segments)
    spanish = " ".join(s.text for c in transcript.chunks if c.language and c.language[0] == "es" for s in c.segments)
    assert tk.word_recall(es_text, spanish) >= 0.6, spanish  # Spanish words, not an English rendering
    assert tk.word_recall(en_text, english) >= 0.8, english


def test_a_forced_language_is_kept_for_every_chunk(two_languages: tuple[Path, str, str], pool: Pool) -> None:
    path, _, _ = two_languages
    transcript = pipeline.run(path, pool, pipeline.PipelineOptions(language="en"))
    assert transcript.language == "en"
    assert {c.language[0] for c in transcript.chunks if c.language} == {"en"}
