"""Issue 11 through a real `smapd run`: profiles from a real TOML file, real clips dropped into real
profile folders, the real model; sidecars, refusals and a SIGHUP that re-reads the profiles file.

One daemon for the module (testkit.Node), always killed with its workers.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import testkit as tk
from testkit import Node, SpoolView

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

PROFILES = """\
[profile.en-subs]
language = "en"
formats = ["txt", "srt"]

[profile.spanish]
language = "es"
formats = "txt"
beam_size = 1

[profile.mixed]
language_mode = "chunk"
formats = "txt"
"""
SPANISH = tk.DATA_DIR / "fleurs-es-002.ogg"
CLIP = tk.SHORT_CLIP
CLIP_TEXT = tk.reference_text(CLIP)
NODE_SETTINGS = {"SMAPD_CPU_THREADS": 1, "SMAPD_FORMATS": "txt", "SMAPD_WATCH": "inotify",
                 "SMAPD_SETTLE_SECONDS": 1.5, "SMAPD_LEASE_SECONDS": 10, "SMAPD_SHUTDOWN_GRACE_SECONDS": 30}


def make_env(model_cache_dir: Path, **extra: object) -> dict[str, str]:
    return tk.daemon_env(model_cache_dir, **{**NODE_SETTINGS, **extra})


class Spool(SpoolView):
    """SpoolView (drops by rename into inbox/ or a profile folder) plus files put from the stage and
    reports found by a glob, which reach into profile sub-folders of outbox/ and failed/."""

    def put(self, rel: str, data: bytes) -> None:
        tmp = self.stage / f"put-{time.monotonic_ns()}"
        tmp.write_bytes(data)
        os.rename(tmp, self.inbox / rel)

    def report(self, where: str, pattern: str, node: Node, timeout: float = 90) -> tuple[Path, dict[str, Any]]:
        found: list[Path] = []

        def look() -> bool:
            found[:] = sorted((self.root / where).glob(pattern))
            return bool(found)

        if not tk.wait_for(look, timeout, 0.1):
            pytest.fail(f"no {where}/{pattern} within {timeout} s\n{self.log_tails(3000)}")
        assert len(found) == 1, found
        return found[0], json.loads(found[0].read_bytes())

    def files(self, d: str) -> list[str]:
        return sorted(str(p.relative_to(self.root / d)) for p in (self.root / d).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_dir: Path,
           model_cache_dir: Path) -> Iterator[tuple[Node, Spool, Path]]:
    root = tmp_path_factory.mktemp("profiles")
    config = root / "smapd.env"
    # language_mode=file here: the shipped default is chunk since the merge with the new engine, and
    # the mixed-recording test needs a global that the profile's language_mode=chunk overrides
    config.write_text("SMAPD_LANGUAGE=auto\nSMAPD_FORMATS=vtt\nSMAPD_CHUNK_SECONDS=12\nSMAPD_LANGUAGE_MODE=file\n")
    (root / "profiles.toml").write_text(PROFILES)  # found next to SMAPD_CONFIG
    env = make_env(model_cache_dir, SMAPD_CONFIG=str(config))
    for key in ("SMAPD_LANGUAGE", "SMAPD_FORMATS"):
        del env[key]  # from the env file: globals a profile overrides
    node = Node("prof", root / "spool", root, env)
    try:
        node.launch()
        yield node, Spool(node.spool, nodes=(node,), expect_alive=True), root
    finally:
        tk.kill_all(node)


def test_a_clip_in_a_profile_folder_gets_that_profiles_options_and_outputs_in_its_outbox(
        daemon: tuple[Node, Spool, Path]) -> None:
    node, sp, _ = daemon
    for d in ("inbox", "processing", "archive", "failed", "outbox"):
        assert (sp.root / d / "en-subs").is_dir() and (sp.root / d / "spanish").is_dir()
    sp.drop(CLIP, "en-subs/talk.ogg")
    sp.drop(CLIP, "talk.ogg")  # the same name at the top: global options, no collision
    path, r = sp.report("outbox", "en-subs/talk.report.json", node)
    assert r["outcome"] == "success" and r["language"]["code"] == "en"
    assert r["outputs"] == {".txt": "talk.txt", ".srt": "talk.srt"} and r["job"]["profile"] == "en-subs"
    assert r["job"]["options"]["language"] == "en" and r["job"]["options"]["formats"] == "txt,srt"
    text = (path.parent / "talk.txt").read_text()
    assert tk.word_recall(CLIP_TEXT, text) >= 0.6, text
    assert tk.parse_srt((path.parent / "talk.srt").read_text())
    _, top = sp.report("outbox", "talk.report.json", node)
    assert top["outputs"] == {".vtt": "talk.vtt"} and top["job"]["profile"] is None
    assert tk.wait_for(lambda: sp.files("archive") == sorted(
        [f"en-subs/{r['job']['id']}.talk.ogg", f"{top['job']['id']}.talk.ogg"]), 10), sp.files("archive")


def test_a_sidecar_overrides_the_formats_of_one_file_and_is_archived_with_it(daemon: tuple[Node, Spool, Path]) -> None:
    node, sp, _ = daemon
    sp.put("en-subs/side.ogg.smapd.json", json.dumps({"formats": ["json"], "word_timestamps": True}).encode())
    sp.drop(CLIP, "en-subs/side.ogg")
    _, r = sp.report("outbox", "en-subs/side.report.json", node)
    assert r["outcome"] == "success" and r["outputs"] == {".json": "side.json"}
    assert r["job"]["options"]["formats"] == "json" and r["job"]["options"]["language"] == "en"
    words = json.loads((sp.root / "outbox" / "en-subs" / "side.json").read_bytes())
    assert "words" in json.dumps(words)
    job = r["job"]["id"]
    assert tk.wait_for(lambda: {f"en-subs/{job}.side.ogg", f"en-subs/{job}.side.ogg.smapd.json"}
                            <= set(sp.files("archive")), 10), sp.files("archive")
    assert not any(n.startswith("en-subs/side") for n in sp.files("outbox") if not n.startswith("en-subs/side."))


def test_an_initial_prompt_in_a_sidecar_reaches_the_decoder(daemon: tuple[Node, Spool, Path]) -> None:
    """Whisper base hears "Mariana's"; told the name (initial_prompt, or hotwords), it writes "Marianas"."""
    node, sp, _ = daemon
    clip = tk.DATA_DIR / "fleurs-en-006.ogg"
    sp.drop(clip, "en-subs/plain.ogg")
    sp.put("en-subs/prompted.ogg.smapd.json", b'{"initial_prompt": "The Northern Marianas."}')
    sp.drop(clip, "en-subs/prompted.ogg")
    sp.put("en-subs/hot.ogg.smapd.toml", b'hotwords = "Marianas"\n')
    sp.drop(clip, "en-subs/hot.ogg")
    texts = {}
    for stem in ("plain", "prompted", "hot"):
        path, r = sp.report("outbox", f"en-subs/{stem}.report.json", node)
        texts[stem] = (path.parent / f"{stem}.txt").read_text()
    assert "Mariana's" in texts["plain"], texts
    assert "Marianas " in texts["prompted"] and "Marianas " in texts["hot"], texts
    assert r["job"]["options"]["hotwords"] == "Marianas"


def test_a_bad_sidecar_sends_its_file_to_failed_naming_the_key(daemon: tuple[Node, Spool, Path]) -> None:
    node, sp, _ = daemon
    sp.put("spanish/bad.ogg.smapd.json", b'{"beam_size": 0, "formats": "txt"}')
    sp.drop(SPANISH, "spanish/bad.ogg")
    _, r = sp.report("failed", "spanish/*.bad.ogg.report.json", node)
    assert r["outcome"] == "failed"
    assert r["error"] == "sidecar bad.ogg.smapd.json: beam_size=0 is invalid: expected a whole number >= 1"
    job = r["job"]["id"]
    assert sorted(n for n in sp.files("failed") if job in n) == [
        f"spanish/{job}.bad.ogg", f"spanish/{job}.bad.ogg.report.json", f"spanish/{job}.bad.ogg.smapd.json"]
    assert not [n for n in sp.files("outbox") if "bad" in n]


def test_an_unknown_sub_folder_is_refused_with_a_report_naming_the_known_profiles(
        daemon: tuple[Node, Spool, Path]) -> None:
    node, sp, _ = daemon
    stage = sp.stage / "french"
    stage.mkdir()
    shutil.copyfile(CLIP, stage / "talk.ogg")
    os.rename(stage, sp.root / "inbox" / "french")
    _, r = sp.report("failed", "*.french.report.json", node, timeout=30)
    assert "not a profile's drop folder (the known profiles are en-subs, mixed, spanish)" in r["error"]


def test_language_mode_chunk_detects_each_chunks_language_in_a_mixed_recording(
        daemon: tuple[Node, Spool, Path]) -> None:
    """Spanish, 2 s of silence, English: two chunks. Detected once per file (this spool's global) the
    English half comes out as Spanish; the profile's language_mode=chunk gets both right."""
    node, sp, _ = daemon
    silence = np.zeros(2 * tk.RATE, dtype=np.int16)
    pcm = np.concatenate([tk.decode_pcm16(SPANISH), silence, tk.decode_pcm16(CLIP)])
    mixed = tk.write_pcm16_wav(sp.stage / "mixed.wav", pcm)
    sp.drop(mixed, "mixed/both.wav")
    sp.drop(mixed, "both.wav")
    path, r = sp.report("outbox", "mixed/both.report.json", node)
    assert len(r["chunks"]) == 2 and r["job"]["options"]["language_mode"] == "chunk"
    text = (path.parent / "both.txt").read_text()
    assert "plaza de San Pedro" in text and tk.word_recall(CLIP_TEXT, text) >= 0.6, text
    _, once = sp.report("outbox", "both.report.json", node)
    assert once["job"]["options"]["language_mode"] == "file" and once["language"]["code"] == "es"
    assert tk.word_recall(CLIP_TEXT, (sp.root / "outbox" / "both.vtt").read_text()) < 0.6


def test_sighup_rereads_the_profiles_file_and_a_bad_one_keeps_the_running_profiles(
        daemon: tuple[Node, Spool, Path]) -> None:
    node, sp, root = daemon
    assert node.proc is not None
    (root / "profiles.toml").write_text(PROFILES + '[profile.late]\nlanguage = "es"\nformats = "txt"\n')
    node.proc.send_signal(signal.SIGHUP)
    assert node.log_has("reload: profiles en-subs, late, mixed, spanish", 15), node.log_text()[-2000:]
    assert tk.wait_for(lambda: (sp.root / "inbox" / "late").is_dir(), 5)
    sp.drop(SPANISH, "late/hola.ogg")
    _, r = sp.report("outbox", "late/hola.report.json", node)
    assert r["language"]["code"] == "es" and r["outputs"] == {".txt": "hola.txt"} and r["job"]["profile"] == "late"
    (root / "profiles.toml").write_text('[profile.late]\nlanguag = "es"\n')
    node.proc.send_signal(signal.SIGHUP)
    assert node.log_has("unknown key 'languag'", 15) and node.log_has("keeping the running profiles", 5)
    assert node.alive()
    sp.drop(CLIP, "en-subs/still.ogg")
    _, r = sp.report("outbox", "en-subs/still.report.json", node)
    assert r["outputs"] == {".txt": "still.txt", ".srt": "still.srt"}


def test_smapd_transcribe_uses_the_same_profiles_and_names_the_output_stem(tmp_path: Path, model_dir: Path,
                                                                            model_cache_dir: Path) -> None:
    """--profile applies the profile; a FILE.smapd.json next to an input applies to it; flags win;
    the report names job.output_stem (it was null before)."""
    import subprocess
    import sys

    (tmp_path / "profiles.toml").write_text(PROFILES)
    shutil.copyfile(CLIP, tmp_path / "a.ogg")
    shutil.copyfile(CLIP, tmp_path / "b.ogg")
    (tmp_path / "b.ogg.smapd.json").write_text('{"formats": "json"}')
    env = make_env(model_cache_dir)
    del env["SMAPD_FORMATS"]
    base = [sys.executable, "-m", "smapd.cli", "transcribe", "--profiles", str(tmp_path / "profiles.toml"),
            "--profile", "en-subs", "-q"]
    p = subprocess.run([*base, "-o", str(tmp_path / "out"), str(tmp_path / "a.ogg"), str(tmp_path / "b.ogg")],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["a.report.json", "a.srt", "a.txt", "b.json", "b.report.json"]
    r = json.loads((out / "a.report.json").read_bytes())
    assert r["job"]["output_stem"] == "a" and r["job"]["profile"] == "en-subs" and r["language"]["code"] == "en"
    assert r["outputs"] == {".txt": "a.txt", ".srt": "a.srt"}
    p = subprocess.run([*base, "--formats", "vtt", "-o", str(tmp_path / "flag"), str(tmp_path / "a.ogg")],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0 and sorted(os.listdir(tmp_path / "flag")) == ["a.report.json", "a.vtt"], p.stderr
