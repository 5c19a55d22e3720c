"""`lamina faces enroll|identify|verify`: enrol people from a folder and match faces with a face run
(lamina.runs.faces)."""

from __future__ import annotations

import argparse
import json

_EPILOG = """examples:
  lamina train configs/orl_faces_arcface.yaml
  lamina faces enroll runs/orl-faces-arcface datasets/orl_faces --out gallery.json
  lamina faces identify runs/orl-faces-arcface gallery.json photo.jpg
  lamina faces verify runs/orl-faces-arcface a.png b.png"""


def add_parsers(sub) -> None:
    f = sub.add_parser("faces", help="face recognition with a face run: enrol a folder of people, identify or "
                                     "verify faces", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_EPILOG)
    verbs = f.add_subparsers(dest="faces_cmd", required=True, metavar="{enroll,identify,verify}")
    e = verbs.add_parser("enroll", help="one template per person from a folder of sub-folders (one per person)")
    e.add_argument("run", help="a run folder trained with task face")
    e.add_argument("folder", help="one sub-folder of images per person (PGM, PNG, JPEG, BMP; any size)")
    e.add_argument("--out", required=True, help="the gallery file to write (JSON)")
    e.add_argument("--far", type=float, default=0.01,
                   help="false-accept rate that sets the gallery's match threshold (default 0.01)")
    i = verbs.add_parser("identify", help="the enrolled people nearest to each image")
    i.add_argument("run")
    i.add_argument("gallery", help="a gallery written by `lamina faces enroll`")
    i.add_argument("images", nargs="+")
    i.add_argument("--top-k", type=int, default=3)
    i.add_argument("--threshold", type=float, help="cosine a match needs (default: the gallery's)")
    v = verbs.add_parser("verify", help="are two images the same person?")
    v.add_argument("run")
    v.add_argument("a")
    v.add_argument("b")
    v.add_argument("--threshold", type=float, help="cosine for 'same person' (default: FAR 1%% on the run's "
                                                   "validation split)")
    for p in (f, e, i, v):
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def cmd_faces(a, console) -> int:
    from lamina.runs import faces

    if a.faces_cmd == "enroll":
        from rich.progress import Progress

        with Progress(console=console, transient=True, disable=a.json) as bar:
            job = bar.add_task("enrolling", total=None)
            r = faces.enroll(a.run, a.folder, a.out, a.far,
                             on_person=lambda n, k: bar.update(job, advance=1, description=f"enrolled {n}"))
        if a.json:
            print(json.dumps(r))
        else:
            thr = "none (one person)" if r["threshold"] is None else f"{r['threshold']:.4f} (FAR {r['far']:g})"
            console.print(f"[bold]{r['people']}[/] people, {r['images']} images -> {r['gallery']}; threshold {thr}")
    elif a.faces_cmd == "identify":
        for r in faces.identify(a.run, a.gallery, a.images, a.top_k, a.threshold):
            if a.json:
                print(json.dumps(r))
            else:
                c = ", ".join(f"{x['name']} {x['score']:.3f}" for x in r["candidates"])
                console.print(f"{r['image']}: [bold]{r['match'] or 'unknown'}[/]  ({c})")
    else:
        r = faces.verify(a.run, a.a, a.b, a.threshold)
        if a.json:
            print(json.dumps(r))
        else:
            console.print(f"{'[bold green]same person[/]' if r['same_person'] else '[bold red]different people[/]'}"
                          f": cosine {r['score']:.4f}, threshold {r['threshold']:.4f} ({r['threshold_from']})")
    return 0


COMMANDS = {"faces": cmd_faces}
