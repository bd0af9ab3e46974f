"""Custom vocabulary (issue 11): does an initial prompt or hotwords help with names and jargon?

Real clips with names or rare words (from /work/shared/data/speech), one shared vocabulary (what a
profile would hold), four variants interleaved per clip: none, initial_prompt, hotwords, both.
Prints the WER over the clips, the recall of the vocabulary words (how many of the target words
in the references come out spelled right), and the WER of control clips where none of them is spoken. Decoding is deterministic (beam search at temperature 0
first), so one pass is the measurement.

Usage: PYTHONPATH=$PWD SMAPD_MODEL_CACHE=... .venv/bin/python bench/vocabulary.py [DATA_DIR]
"""
from __future__ import annotations

import sys

import testkit as tk
from smapd import pipeline
from smapd.runner import JobConfig
from smapd.settings import load_settings

DATA = tk.speech_dir(sys.argv[1] if len(sys.argv) > 1 else None)  # ../shared/data/speech by default
# clip -> the target words its reference contains
CLIPS = {
    "ami-ES2011a-headset0-40s-46s.wav": ("abigail", "claflin", "abbie"),
    "cmuarctic-aew-a0001.wav": ("philip", "steels"),
    "fleurs-en-006.ogg": ("marianas",),
    "librispeech-121-127105-0000.flac": ("douglas",),
    "librivox-sense_and_sensibility_01_austen_64kb-0870.wav": ("dashwood",),
    "librispeech-3570-5694-0005.flac": ("tabu", "victuals"),
    "librispeech-8555-284447-0000.flac": ("sailorman", "dominions"),
    "librispeech-1320-122617-0001.flac": ("practised", "intellects"),
}
# controls: none of the vocabulary is spoken; the prompt must not make them worse
CONTROLS = ("jfk.flac", "ljspeech-LJ001-0001.wav", "fleurs-en-003.ogg", "cmuarctic-a0024-deepspeech.wav",
            "fleurs-en-004.ogg")
PROMPT = ("Names: Abigail Claflin (Abbie), Philip Steels, the Northern Marianas, Douglas, John Dashwood. "
          "Words: tabu, victuals, sailorman, dominions, practised intellects.")
HOTWORDS = "Abigail Claflin Abbie Philip Steels Marianas Douglas Dashwood tabu victuals sailorman dominions practised"
VARIANTS = {"none": {}, "initial_prompt": {"initial_prompt": PROMPT}, "hotwords": {"hotwords": HOTWORDS},
            "both": {"initial_prompt": PROMPT, "hotwords": HOTWORDS}}


def main() -> None:
    refs = {}
    for line in (DATA / "manifest.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        cols = line.split("\t")
        refs[cols[0]] = cols[5]
    config = JobConfig.from_settings(load_settings(language="en", max_parallel_workers=1, formats="txt"))
    totals = {v: [0, 0, 0, 0, 0, 0] for v in VARIANTS}  # edits, words, targets right, targets, control edits, words
    with config.make_pool() as pool:
        for clip, targets in [*CLIPS.items(), *((c, None) for c in CONTROLS)]:
            ref = refs[clip]
            for variant, opts in VARIANTS.items():  # interleaved: each clip under every variant in turn
                cfg = config.for_job(None, opts)
                text = pipeline.run(DATA / clip, pool, cfg.pipeline).text
                hyp = tk.normalize(text).split()
                t = totals[variant]
                e, n = tk.word_errors(ref, text)
                if targets is None:
                    t[4] += e
                    t[5] += n
                else:
                    t[0] += e
                    t[1] += n
                    t[2] += sum(1 for w in targets if w in hyp)
                    t[3] += len(targets)
                print(f"{clip[:28]:28} {variant:14} {text.strip()[:90]}", flush=True)
    print(f"\n{'variant':14} {'WER':>6} {'vocabulary words right':>24} {'WER of controls':>16}")
    for variant, (e, n, right, count, ce, cn) in totals.items():
        print(f"{variant:14} {100 * e / n:5.1f}% {right:>16}/{count} ({100 * right / count:.0f}%) {100 * ce / cn:15.1f}%")


if __name__ == "__main__":
    main()
