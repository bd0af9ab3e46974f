"""``smapd run | transcribe FILE | status | check``: the only place that calls sys.exit.

Exit codes: 0 success, 1 the job failed (nothing transcribed or bad input), 2 bad usage or
configuration, 3 partial (some chunks failed; outputs written with the gaps marked).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smapd import __version__
from smapd.errors import SmapdError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smapd", description="Transcription daemon and command-line transcriber.")
    p.add_argument("--version", action="version", version=f"smapd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transcribe", help="transcribe files now, with the daemon's pipeline, no spool")
    t.add_argument("files", nargs="+", type=Path, metavar="FILE")
    t.add_argument("-o", "--output-dir", type=Path, default=Path("."), help="where outputs go (default: .)")
    opts = t.add_argument_group("options (each overrides its setting)")
    opts.add_argument("--profile", help="a profile of the profiles file (its options; these flags still win)")
    opts.add_argument("--profiles", type=Path, metavar="FILE", help="SMAPD_PROFILES: the profiles file")
    opts.add_argument("--model", help="SMAPD_MODEL: 'embedded', a CTranslate2 directory or a model name")
    opts.add_argument("--engine", choices=("faster-whisper", "command"), help="SMAPD_ENGINE")
    opts.add_argument("--command", dest="command_template", help="SMAPD_COMMAND for --engine command")
    opts.add_argument("--language", help="SMAPD_LANGUAGE: 'auto' or a code such as en")
    opts.add_argument("--task", choices=("transcribe", "translate"), help="SMAPD_TASK")
    opts.add_argument("--formats", help="SMAPD_FORMATS: comma-separated txt,srt,vtt,json")
    opts.add_argument("--workers", help="MAX_PARALLEL_WORKERS: 'auto' or a number")
    opts.add_argument("--sequential", action="store_true", help="USE_PARALLEL_TRANSCRIPTION=false")
    opts.add_argument("--chunk-seconds", type=float, help="SMAPD_CHUNK_SECONDS (5-30)")
    opts.add_argument("--chunk-timeout", help="CHUNK_TIMEOUT in seconds")
    opts.add_argument("--beam-size", type=int, help="SMAPD_BEAM_SIZE")
    opts.add_argument("--initial-prompt", help="SMAPD_INITIAL_PROMPT: text (names, jargon) the decoder sees first")
    opts.add_argument("--hotwords", help="SMAPD_HOTWORDS: words to favour")
    opts.add_argument("--language-mode", choices=("file", "chunk"), help="SMAPD_LANGUAGE_MODE: detect once or per chunk")
    opts.add_argument("--word-timestamps", type=_bool, metavar="BOOL", help="SMAPD_WORD_TIMESTAMPS (words in json)")
    opts.add_argument("--vad", type=_bool, metavar="BOOL", help="SMAPD_VAD: silence-aware chunks (false: fixed cuts)")
    opts.add_argument("--device", choices=("cpu", "cuda", "auto"), help="SMAPD_DEVICE")
    opts.add_argument("--compute-type", help="SMAPD_COMPUTE_TYPE (int8, float16, ...)")
    t.add_argument("--progress", choices=("auto", "bar", "log"), default="auto",
                   help="progress bar on a terminal (auto), or log lines")
    t.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")

    sub.add_parser("run", help="serve the spool until stopped (the daemon; systemd runs this)")
    st = sub.add_parser("status", help="files waiting, jobs in progress, recent failures, nodes")
    shown = st.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="machine-readable output")
    shown.add_argument("--prometheus", action="store_true", help="the spool-wide view in Prometheus text format")
    st.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                    help="refresh in place every SECONDS (default 2) until Ctrl-C")
    st.add_argument("--spool", type=Path, help="the spool directory (default: SMAPD_SPOOL_DIR)")

    sub.add_parser("check", help="validate the configuration and load the model, then exit")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model, "engine": args.engine, "command": args.command_template, "language": args.language,
        "task": args.task, "formats": args.formats, "max_parallel_workers": args.workers,
        "use_parallel_transcription": False if args.sequential else None, "chunk_seconds": args.chunk_seconds,
        "chunk_timeout": args.chunk_timeout, "beam_size": args.beam_size, "word_timestamps": args.word_timestamps,
        "vad": args.vad, "device": args.device, "compute_type": args.compute_type, "profiles": args.profiles,
        "initial_prompt": args.initial_prompt, "hotwords": args.hotwords, "language_mode": args.language_mode,
    }


def _status(args: argparse.Namespace) -> int:
    from smapd.settings import load_settings
    from smapd.spool import Spool
    from smapd.status import render_json, render_text

    settings = load_settings()
    root = args.spool or settings.spool_dir
    if not (root / "inbox").is_dir():
        raise SmapdError(f"{root} is not a smapd spool (no inbox/); set SMAPD_SPOOL_DIR or pass --spool")
    spool = Spool(root, settings.node, lease_seconds=settings.lease_seconds)

    def show() -> str:
        state = spool.list_state()
        if args.prometheus:
            from smapd.metrics import spool_metrics

            return spool_metrics(state, settings.lease_seconds).decode()
        return render_json(state) if args.json else render_text(state)

    if args.watch is None:
        print(show())
        return 0
    try:
        while True:  # clear the screen and redraw (ANSI: cursor home, erase below), like watch(1)
            sys.stdout.write("\x1b[H\x1b[J" + show() + "\n")
            sys.stdout.flush()
            time.sleep(max(0.2, args.watch))
    except KeyboardInterrupt:
        return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "transcribe":
            from smapd.transcribe import transcribe_files

            code = transcribe_files(args.files, args.output_dir, _overrides(args), progress=args.progress,
                                    quiet=args.quiet, profile=args.profile)
        elif args.command == "run":
            from smapd.daemon import run

            code = run()
        elif args.command == "status":
            code = _status(args)
        elif args.command == "check":
            from smapd.transcribe import check

            code = check()
        else:  # pragma: no cover - argparse rejects unknown commands
            code = EXIT_USAGE
    except SmapdError as e:
        print(f"smapd: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print("smapd: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
