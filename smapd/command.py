"""The command engine: an external recognizer per chunk, in its own process group.

From a template such as SMAP's ``whisper-cli -m {model} -f {input} -otxt -of {output_base}``;
the chunk goes in as a 16 kHz WAV, the text comes back from ``{output_base}.txt``.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from smapd.engine import DecodeOptions, EngineSpec, Transcribed
from smapd.errors import ChunkError, ChunkTimeout, ConfigError
from smapd.models import Segment


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

    def run(self, audio: np.ndarray, options: DecodeOptions, timeout: float) -> Transcribed:
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
        return Transcribed((Segment(0.0, round(len(audio) / 16000, 3), text),) if text else (),
                           (options.language, 1.0) if options.language else None)
