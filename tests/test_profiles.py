"""The profiles file and sidecars (issue 11): parsing, validation (every error is one line naming the
file, the profile, the key, the value and what is allowed), and the layering settings < profile <
sidecar that a job runs with."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from smapd import profiles, runner
from smapd.engine import EngineSpec
from smapd.errors import ConfigError
from smapd.profiles import Profile, Profiles, parse_profiles, parse_sidecar
from smapd.settings import Settings

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "profiles.toml.example"
SRC = Path("/etc/smapd/profiles.toml")


def parse(text: str) -> Profiles:
    return parse_profiles(text.encode(), SRC)


def test_a_profile_sets_only_what_it_names_with_the_settings_own_normalisation() -> None:
    p = parse('[profile.meetings-en]\nlanguage = "EN"\nformats = ["srt", "TXT", "srt"]\nbeam_size = 2\n'
              'hotwords = "Kubernetes"\n[profile.mixed]\nlanguage_mode = "chunk"\nformats = "vtt"\n')
    assert p.names == ("meetings-en", "mixed")
    assert p.get("meetings-en").options == {"language": "en", "formats": "srt,txt", "beam_size": 2,
                                            "hotwords": "Kubernetes"}
    assert p.get("mixed").options == {"language_mode": "chunk", "formats": "vtt"}


def test_the_shipped_example_parses() -> None:
    p = parse_profiles(EXAMPLE.read_bytes(), EXAMPLE)
    assert p.names and all(profiles.valid_name(n) for n in p.names)


@pytest.mark.parametrize("text, message", [
    ('[profile.x]\nlang = "en"\n',
     (r"^profiles file /etc/smapd/profiles.toml: profile 'x': unknown key 'lang'; allowed: language, task, "
     r"beam_size, formats, word_timestamps, vad, initial_prompt, hotwords, language_mode$")),
    ('[profile.x]\nlanguage = "english"\n',
     (r"^profiles file /etc/smapd/profiles.toml: profile 'x': language='english' is invalid: expected 'auto' or "
     r"a language code such as en, de, fr$")),
    ('[profile.x]\nbeam_size = 0\n',
     r"^profiles file \S+: profile 'x': beam_size=0 is invalid: expected a whole number >= 1$"),
    ('[profile.x]\ntask = "summarise"\n',
     r"^profiles file \S+: profile 'x': task='summarise' is invalid: Input should be 'transcribe' or 'translate'$"),
    ('[profile.x]\nformats = ["txt", "docx"]\n',
     (r"^profiles file \S+: profile 'x': formats=\['txt', 'docx'\] is invalid: expected a comma-separated subset "
     r"of txt,srt,vtt,json$")),
    ('[profile.x]\nvad = "maybe"\n',
     r"^profiles file \S+: profile 'x': vad='maybe' is invalid: Input should be a valid boolean"),
    ('[profile.x]\nlanguage_mode = "segment"\n',
     r"^profiles file \S+: profile 'x': language_mode='segment' is invalid: Input should be 'file' or 'chunk'$"),
    ('[profile.x]\ninitial_prompt = 5\n',
     r"^profiles file \S+: profile 'x': initial_prompt=5 is invalid: Input should be a valid string$"),
    ('[profile.x]\nhotwords = { a = 1 }\n',
     r"^profiles file \S+: profile 'x': hotwords=\{'a': 1\} is invalid: expected a single value$"),
    ('[profile."a b"]\nlanguage = "en"\n',
     (r"^profiles file \S+: profile name 'a b' is invalid: expected 1-64 letters, digits, '-' or '_', starting "
     r"with a letter or digit$")),
    ('[profile.".hidden"]\n', r"profile name '.hidden' is invalid"),
    ('[profile.x]\nlanguage = "en"\n[profile.x]\n', r"^profiles file \S+: not valid TOML: .*line 3"),
    ('language = "en"\n', r"^profiles file \S+: unknown top-level key 'language'; allowed: \[profile.NAME\] tables$"),
    ('profile = 3\n', r"^profiles file \S+: 'profile' must be tables \[profile.NAME\]$"),
    ('[profile]\nx = 3\n', r"^profiles file \S+: profile 'x': expected a table of options, got 3$"),
])
def test_every_bad_profiles_file_is_one_line_naming_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        parse(text)
    assert "\n" not in str(e.value)


def test_bad_bytes_and_unknown_profile_name_the_file_and_the_known_profiles() -> None:
    with pytest.raises(ConfigError, match=r"^profiles file \S+: not UTF-8 text$"):
        parse_profiles(b'[profile.x]\nhotwords = "\xff"\n', SRC)
    with pytest.raises(ConfigError, match=r"^no profile 'nope' in /etc/smapd/profiles.toml \(known profiles: a, b\)$"):
        parse("[profile.b]\n[profile.a]\n").get("nope")
    assert Profiles().known() == "no profiles are configured"


@pytest.mark.parametrize("data, suffix, message", [
    (b'{"formats": "txt", "lang": "en"}', ".smapd.json",
     r"^sidecar talk.wav.smapd.json: unknown key 'lang'; allowed: language, task, beam_size, formats, "),
    (b'{"beam_size": -1}', ".smapd.json", r"^sidecar talk.wav.smapd.json: beam_size=-1 is invalid: expected a whole"),
    (b'{"formats": ', ".smapd.json", r"^sidecar talk.wav.smapd.json: not valid JSON: "),
    (b'["txt"]', ".smapd.json", r"^sidecar talk.wav.smapd.json: expected a table of options at the top level$"),
    (b'language = "xx-yy"', ".smapd.toml", r"^sidecar talk.wav.smapd.json: language='xx-yy' is invalid: "),
    (b'language = ', ".smapd.toml", r"^sidecar talk.wav.smapd.json: not valid TOML: "),
])
def test_every_bad_sidecar_is_one_line_naming_the_key_and_what_is_allowed(data: bytes, suffix: str,
                                                                          message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        parse_sidecar(data, suffix, "sidecar talk.wav.smapd.json")
    assert "\n" not in str(e.value)


def test_sidecars_in_json_and_toml_give_the_same_options() -> None:
    as_json = parse_sidecar(b'{"formats": ["json"], "language": "de", "word_timestamps": true}', ".smapd.json", "s")
    as_toml = parse_sidecar(b'formats = "json"\nlanguage = "de"\nword_timestamps = true\n', ".smapd.toml", "s")
    assert as_json == as_toml == {"formats": "json", "language": "de", "word_timestamps": True}


def config(known: Profiles, **settings: object) -> runner.JobConfig:
    s = Settings.model_construct(**settings)  # type: ignore[arg-type]
    return runner.JobConfig(engine=EngineSpec(kind="command", model=""), workers=1, profiles=known,
                            **runner.reloadable(s))


def test_a_job_runs_with_settings_then_profile_then_sidecar() -> None:
    known = Profiles({"en": Profile("en", {"language": "en", "formats": "txt,srt", "initial_prompt": "Anna Ng."})})
    base = config(known, beam_size=3, hotwords="Kafka", vad=False)
    assert base.for_job().options == {"language": "auto", "task": "transcribe", "beam_size": 3,
                                      "formats": "txt,srt,vtt,json", "word_timestamps": False, "vad": False,
                                      "initial_prompt": "", "hotwords": "Kafka", "language_mode": "chunk"}
    job = base.for_job("en", {"formats": "json", "language_mode": "chunk"})
    assert job.formats == ("json",) and job.pipeline.language == "en" and job.pipeline.beam_size == 3
    assert job.pipeline.initial_prompt == "Anna Ng." and job.pipeline.hotwords == "Kafka"
    assert job.pipeline.language_mode == "chunk" and job.pipeline.vad is False
    assert job.engine_info().beam_size == 3 and job.pipeline.chunk_seconds == base.pipeline.chunk_seconds
    with pytest.raises(ConfigError, match="no profile 'fr'.*known profiles: en"):
        base.for_job("fr")


def test_the_profiles_file_is_found_next_to_the_env_file_or_named(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "smapd.env").write_text("")
    monkeypatch.setenv("SMAPD_CONFIG", str(tmp_path / "smapd.env"))
    monkeypatch.delenv("SMAPD_PROFILES", raising=False)
    assert profiles.load(Settings()) == Profiles()  # none there: no profiles
    (tmp_path / "profiles.toml").write_text("[profile.de]\nlanguage = 'de'\n")
    assert profiles.load(Settings()).names == ("de",)
    monkeypatch.setenv("SMAPD_PROFILES", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match=r"^SMAPD_PROFILES='\S+missing.toml': no such file$"):
        profiles.load(Settings())


def _smapd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "smapd.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env}, check=False)


def test_smapd_run_with_a_bad_profiles_file_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "profiles.toml"
    bad.write_text('[profile.meetings]\nbeam_size = "wide"\n')
    p = _smapd("run", env={"SMAPD_PROFILES": str(bad), "SMAPD_SPOOL_DIR": str(tmp_path / "spool"),
                           "SMAPD_MODEL_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("smapd:")]
    assert lines == [(f"smapd: profiles file {bad}: profile 'meetings': beam_size='wide' is invalid: "
                     f"Input should be a valid integer, unable to parse string as an integer")], p.stderr


def test_smapd_transcribe_with_an_unknown_profile_exits_2_naming_the_known_ones(tmp_path: Path) -> None:
    good = tmp_path / "profiles.toml"
    good.write_text('[profile.en]\nlanguage = "en"\n')
    (tmp_path / "a.wav").write_bytes(b"x")
    p = _smapd("transcribe", "--profiles", str(good), "--profile", "de", "--engine", "command", "--command",
               "true {input}", str(tmp_path / "a.wav"), env={})
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        f"smapd: no profile 'de' in {good} (known profiles: en)"), p.stderr
