"""`lamina recommend RUN USER_ID --k 10`: the top-k new items for a user of a recommendation run
(lamina.runs.recommend)."""

from __future__ import annotations

import argparse
import json

_EPILOG = """examples:
  lamina train configs/movietweetings_recsys.yaml
  lamina recommend runs/movietweetings-mf 8 --k 10
  lamina recommend runs/movietweetings-mf 8 --json"""


def add_parsers(sub) -> None:
    r = sub.add_parser("recommend", help="top-k new items for a user of a recommendation run",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    r.add_argument("run", help="a run folder trained with task recommendation")
    r.add_argument("user", metavar="USER_ID", help="the user's id as in the data file")
    r.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    r.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint of the run folder")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)


def cmd_recommend(a, console) -> int:
    from lamina.runs.recommend import recommend

    r = recommend(a.run, a.user, a.k, a.which)
    if a.json:
        print(json.dumps(r))
        return 0
    seen = "; ".join(h["title"] or h["item"] for h in r["history"])
    print(f"user {r['user']} ({r['model']}); latest: {seen}")
    for x in r["items"]:
        print(f"{x['rank']:>3}. {x['score']:>8.3f}  {x['title'] + ' (' + x['item'] + ')' if x['title'] else x['item']}")
    return 0


COMMANDS = {"recommend": cmd_recommend}
