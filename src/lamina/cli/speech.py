"""`lamina transcribe RUN audio.wav`: speech to text with a CTC run (lamina.runs.transcribe)."""

from __future__ import annotations

import argparse
import json


def add_parsers(sub) -> None:
    t = sub.add_parser("transcribe", help="transcribe WAV recordings with a speech-recognition run (task ctc)")
    t.add_argument("run", help="a run folder trained with task ctc (e.g. configs/fsdd_ctc.yaml)")
    t.add_argument("audio", nargs="+", help="PCM WAV files at the model's sample rate")
    t.add_argument("--beam", type=int, help="prefix beam width (default: the run's task.beam, 8)")
    t.add_argument("--resample", action="store_true", help="resample other sample rates to the model's")
    t.add_argument("--json", action="store_true", help="one JSON object per file")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (recordings decoded)")
    t.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def cmd_transcribe(a, console) -> int:
    from lamina.cli.progress import progress_bar
    from lamina.runs.transcribe import transcribe_files

    with progress_bar(console, "transcribe", a.no_progress) as bar:
        results = transcribe_files(a.run, a.audio, a.beam, a.resample, progress=bar)
    for f, r in zip(a.audio, results):  # printed once the bar is gone (a live bar would take stdout over)
        if a.json:
            print(json.dumps(r))
        else:
            console.print(f"{f}: [bold]{r['text'] or '(nothing)'}[/]  ({r['seconds']:.1f} s; greedy: "
                          f"{r['greedy'] or '(nothing)'})")
    return 0


COMMANDS = {"transcribe": cmd_transcribe}
