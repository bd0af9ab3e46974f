"""Profile folders and sidecars in the spool (issue 11, DESIGN §1 inv. 11) on real files: the invariants
of §1 inside inbox/<profile>/ (claim by rename, collisions, takeover, release, finish, refusals), an
unknown sub-folder refused naming the known profiles, and sidecars that travel with their file."""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path

import pytest

from smapd import report, runner
from smapd.engine import EngineSpec
from smapd.profiles import Profile, Profiles
from smapd.settings import Settings
from smapd.spool import REPORT_SUFFIX, Claim, Spool
from smapd.spool.intake import ORPHAN_SETTLES
from smapd.watcher import InboxWatcher
from testkit.spoolnode import SILENCE, finish_failed, finish_ok, job_of

SETTLE = 0.05


@pytest.fixture
def sp(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool", "n1", lease_seconds=60, settle_seconds=SETTLE, profiles=("en", "notes"))
    s.ensure_layout()
    return s


def drop(sp: Spool, rel: str, data: bytes = b"audio", age: float = 30.0) -> str:
    """Drop ``inbox/<rel>`` the safe way (temp name, then rename), its mtime ``age`` seconds old."""
    dest = sp.inbox / rel
    tmp = dest.parent / ".dropping.part"
    tmp.write_bytes(data)
    t = time.time() - age  # a test file's mtime; the spool never reads the local clock
    os.utime(tmp, (t, t))
    os.rename(tmp, dest)
    return rel


def tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def claim(sp: Spool, rel: str) -> Claim:
    assert rel in sp.scan().ready
    c = sp.claim(rel)
    assert c is not None
    return c


def test_ensure_layout_mirrors_each_profile_under_every_state_dir(sp: Spool) -> None:
    for d in ("inbox", "processing", "archive", "failed", "outbox", ".smapd/stems"):
        assert (sp.root / d / "en").is_dir() and (sp.root / d / "notes").is_dir()


def test_a_file_in_a_profile_folder_is_claimed_published_and_archived_inside_that_profile(sp: Spool) -> None:
    c = claim(sp, drop(sp, "en/talk.wav"))
    assert c.profile == "en" and c.path.parent == sp.processing / "en" and c.original_name == "talk.wav"
    assert sp.list_state()["processing"][0]["profile"] == "en"
    archived = finish_ok(sp, c)
    assert archived.parent == sp.archive / "en" and archived.name == f"{c.job_id}.talk.wav"
    assert tree(sp.outbox) == ["en/talk.report.json", "en/talk.txt"]
    r = json.loads((sp.outbox / "en" / "talk.report.json").read_bytes())
    assert r["job"]["output_stem"] == "talk"
    assert tree(sp.inbox) == [] and tree(sp.processing) == [] and not list(sp.jobs.iterdir())


def test_the_same_name_in_two_folders_and_twice_in_one_never_collides(sp: Spool) -> None:
    first = claim(sp, drop(sp, "talk.wav"))
    second = claim(sp, drop(sp, "en/talk.wav"))
    finish_ok(sp, first, b"root")
    finish_ok(sp, second, b"en")
    third = claim(sp, drop(sp, "en/talk.wav"))
    assert sp.output_stem(third) == "talk.2"
    finish_ok(sp, third, b"en again")
    assert (sp.outbox / "talk.txt").read_bytes() == b"root"
    assert (sp.outbox / "en" / "talk.txt").read_bytes() == b"en"
    assert (sp.outbox / "en" / "talk.2.txt").read_bytes() == b"en again"
    assert len(list((sp.archive / "en").iterdir())) == 2 and len(list(sp.archive.glob("*.talk.wav"))) == 1


def test_a_sub_folder_that_is_no_profile_is_refused_and_its_report_names_the_known_profiles(sp: Spool) -> None:
    (sp.inbox / "fr").mkdir()
    (sp.inbox / "fr" / "talk.wav").write_bytes(b"audio")
    result = sp.scan()
    assert result.ready == () and "fr" in result.refuse
    dest = sp.refuse("fr")
    assert dest is not None and dest.parent == sp.failed and (dest / "talk.wav").exists()
    r = json.loads(dest.with_name(dest.name + REPORT_SUFFIX).read_bytes())
    assert r["outcome"] == "failed" and "not a profile's drop folder" in r["error"]
    assert "the known profiles are en, notes" in r["error"]
    # nothing nested is ever taken: inbox/<profile>/<dir> is refused as a directory, inside its profile
    (sp.inbox / "en" / "sub").mkdir()
    assert "en/sub" in sp.scan().refuse
    assert (nested := sp.refuse("en/sub")) is not None and nested.parent == sp.failed / "en"


def test_a_profile_folder_that_is_a_symlink_is_refused_never_followed(sp: Spool, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.wav").write_bytes(b"audio")
    (sp.inbox / "notes").rmdir()
    (sp.inbox / "notes").symlink_to(outside)
    result = sp.scan()
    assert result.ready == () and "notes" in result.refuse and "symbolic link" in result.refuse["notes"]
    assert sp.refuse("notes") is not None and (outside / "secret.wav").exists()


def test_a_sidecar_is_never_audio_and_is_claimed_and_archived_with_its_file(sp: Spool) -> None:
    drop(sp, "en/talk.wav.smapd.json", b'{"formats": "srt"}', age=0.0)
    result = sp.scan()
    assert result.ready == () and result.waiting == () and result.refuse == {}
    assert sp.waiting_count() == 0
    c = claim(sp, drop(sp, "en/talk.wav"))
    assert tree(sp.inbox) == [] and (sp.jobs / f"{c.job_id}.sidecar.smapd.json").exists()
    assert sp.sidecar(c) == (".smapd.json", b'{"formats": "srt"}')
    archived = finish_ok(sp, c)
    assert tree(sp.archive) == [f"en/{c.job_id}.talk.wav", f"en/{c.job_id}.talk.wav.smapd.json"]
    assert archived.with_name(archived.name + ".smapd.json").read_bytes() == b'{"formats": "srt"}'
    assert not list(sp.jobs.iterdir())


def test_a_file_whose_name_leaves_no_room_for_a_sidecar_has_none(sp: Spool) -> None:
    name = "x" * 251 + ".wav"  # 255 bytes: "<name>.smapd.json" cannot exist (ENAMETOOLONG)
    c = claim(sp, drop(sp, f"en/{name}"))
    assert sp.sidecar(c) is None
    assert finish_ok(sp, c).parent == sp.archive / "en"


def test_a_failed_file_takes_its_sidecar_to_failed_with_exactly_one_report(sp: Spool) -> None:
    drop(sp, "notes/x.mp3.smapd.toml", b'language = "de"\n')
    c = claim(sp, drop(sp, "notes/x.mp3"))
    finish_failed(sp, c, "not audio")
    assert tree(sp.failed) == [f"notes/{c.job_id}.x.mp3", f"notes/{c.job_id}.x.mp3.report.json",
                               f"notes/{c.job_id}.x.mp3.smapd.toml"]
    assert sp.repair() == 0  # the sidecar is not an input without a report
    assert sp.list_state()["failures"][0]["profile"] == "notes"


def test_a_released_claim_hands_its_sidecar_back_first_and_both_can_be_claimed_again(sp: Spool) -> None:
    drop(sp, "en/talk.wav.smapd.json", b"{}")
    c = claim(sp, drop(sp, "en/talk.wav"))
    back = sp.release(c)
    assert back == sp.inbox / "en" / "talk.wav" and tree(sp.inbox) == ["en/talk.wav", "en/talk.wav.smapd.json"]
    again = claim(sp, "en/talk.wav")
    assert sp.sidecar(again) == (".smapd.json", b"{}")


def test_a_takeover_stays_in_the_profile_folder_and_takes_a_sidecar_left_behind(tmp_path: Path, sp: Spool) -> None:
    dead = Spool(sp.root, "n2", lease_seconds=60, settle_seconds=SETTLE, profiles=sp.profiles, alive=lambda pid: False)
    drop(sp, "en/talk.wav.smapd.json", b'{"beam_size": 1}')
    c = claim(sp, drop(sp, "en/talk.wav"))
    # as if n1 had died between the claim's rename and the sidecar's: the sidecar is still in inbox/en/
    os.rename(sp.jobs / f"{c.job_id}.sidecar.smapd.json", sp.inbox / "en" / "talk.wav.smapd.json")
    assert sp.scan().refuse == {}  # not an orphan while its file is claimed
    n1_again = Spool(sp.root, "n1", lease_seconds=60, settle_seconds=SETTLE, profiles=sp.profiles,
                     alive=lambda pid: False)  # n1 restarted: its old claim is its own dead one
    stale = n1_again.recoverable()
    assert [s.job_id for s in stale] == [c.job_id] and stale[0].profile == "en"
    new = n1_again.recover(stale[0])
    assert new is not None and new.profile == "en" and new.path.parent == sp.processing / "en" and new.attempt == 2
    assert n1_again.sidecar(new) == (".smapd.json", b'{"beam_size": 1}') and tree(sp.inbox) == []
    assert dead.list_state()["processing"][0]["profile"] == "en"
    finish_ok(n1_again, new)
    assert tree(sp.archive) == [f"en/{c.job_id}.talk.wav", f"en/{c.job_id}.talk.wav.smapd.json"]


def test_an_orphan_sidecar_is_refused_after_its_grace_with_a_report_saying_so(sp: Spool) -> None:
    drop(sp, "en/late.wav.smapd.json", b"{}", age=0.0)
    assert sp.scan().refuse == {}  # young: its file may still come
    drop(sp, "notes/lost.wav.smapd.json", b"{}", age=ORPHAN_SETTLES * SETTLE + 30)
    refused = sp.scan().refuse
    assert list(refused) == ["notes/lost.wav.smapd.json"]
    dest = sp.refuse("notes/lost.wav.smapd.json")
    assert dest is not None and dest.parent == sp.failed / "notes"
    r = json.loads(dest.with_name(dest.name + REPORT_SUFFIX).read_bytes())
    assert "is a sidecar" in r["error"] and "inbox/notes/lost.wav did not arrive" in r["error"]
    assert "drop the sidecar first and the file last" in r["error"]
    assert r["job"]["profile"] == "notes"


def test_status_names_each_waiting_file_and_job_by_profile(sp: Spool) -> None:
    drop(sp, "en/a.wav")
    drop(sp, "b.wav")
    claim(sp, drop(sp, "notes/c.wav"))
    state = sp.list_state()
    assert sorted((w["name"], w["profile"]) for w in state["waiting"]) == [("a.wav", "en"), ("b.wav", None)]
    assert [(c["name"], c["profile"]) for c in state["processing"]] == [("c.wav", "notes")]
    from smapd.status import render_text

    text = render_text(state)
    assert "a.wav [profile en]" in text and "c.wav [profile notes]" in text


CONFIG = runner.JobConfig(engine=EngineSpec(kind="command", model=""), workers=1,
                          profiles=Profiles({"en": Profile("en", {"language": "en"}), "notes": Profile("notes")}),
                          **runner.reloadable(Settings.model_construct()))


def run(sp: Spool, c: Claim, config: runner.JobConfig = CONFIG) -> str:
    return runner.run_claim(c, sp, None, config, node=sp.node, lost=threading.Event(),  # type: ignore[arg-type]
                            cancelled=threading.Event())


def test_a_bad_sidecar_sends_its_file_to_failed_naming_the_key_and_what_is_allowed(sp: Spool) -> None:
    drop(sp, "en/talk.wav.smapd.json", b'{"formats": ["txt", "pdf"]}')
    c = claim(sp, drop(sp, "en/talk.wav"))
    assert run(sp, c) == "failed"
    r = json.loads((sp.failed / "en" / f"{c.job_id}.talk.wav{REPORT_SUFFIX}").read_bytes())
    assert r["error"] == ("sidecar talk.wav.smapd.json: formats=['txt', 'pdf'] is invalid: expected a "
                          "comma-separated subset of txt,srt,vtt,json")
    assert r["job"]["profile"] == "en" and r["job"]["options"] is None
    assert tree(sp.failed) == [f"en/{c.job_id}.talk.wav", f"en/{c.job_id}.talk.wav.report.json",
                               f"en/{c.job_id}.talk.wav.smapd.json"]


def test_a_claim_whose_profile_is_gone_fails_naming_the_known_profiles(sp: Spool) -> None:
    c = claim(sp, drop(sp, "notes/talk.wav"))
    without = runner.JobConfig(**{**CONFIG.__dict__, "profiles": Profiles({"en": Profile("en")})})
    assert run(sp, c, without) == "failed"
    r = json.loads((sp.failed / "notes" / f"{c.job_id}.talk.wav{REPORT_SUFFIX}").read_bytes())
    assert r["error"] == "it was dropped in inbox/notes/, but there is no profile 'notes' (known profiles: en)"


def test_the_watcher_hints_files_in_profile_folders_by_their_relative_name(sp: Spool) -> None:
    hints: queue.Queue[tuple[str, bool]] = queue.Queue()
    w = InboxWatcher(sp.inbox, lambda name, ready: hints.put((name, ready)), mode="inotify")
    w.start()
    try:
        (sp.inbox / "en" / "sub").mkdir()
        (sp.inbox / "en" / "sub" / "deep.wav").write_bytes(b"x")
        (sp.inbox / "en" / "talk.wav").write_bytes(b"x")  # close-write: ready
        deadline, seen = time.monotonic() + 5, []
        while ("en/talk.wav", True) not in seen and time.monotonic() < deadline:
            try:
                seen.append(hints.get(timeout=0.2))
            except queue.Empty:
                pass
        assert ("en/talk.wav", True) in seen
        assert not any("deep" in name for name, _ in seen)  # deeper than a profile folder: no hints
    finally:
        w.stop()


def test_job_of_and_silence_helpers_still_match(sp: Spool) -> None:
    # guards the test kit's spool helpers this module relies on
    c = claim(sp, drop(sp, "en/x.wav"))
    assert job_of(c).id == c.job_id and SILENCE.outcome.value == "success" and report.REPORT_VERSION == 1
