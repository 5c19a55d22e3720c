"""Make datasets/movietweetings from the MovieTweetings 100K snapshot (Dooms et al. 2013, MIT licence).

Input: a folder holding the snapshot's `ratings.dat` (user_id::movie_id::rating::rating_timestamp) and
`movies.dat` (movie_id::title (year)::genre|genre), i.e. `snapshots/100K/` of github.com/sidooms/MovieTweetings
(the ratings of the first 100,000 tweets collected, 28 Feb - 1 Sep 2013; blob a1e4320b of ratings.dat).

Recipe (deterministic; the same input gives byte-identical output):
1. read every rating; each (user, movie) pair occurs once in the snapshot (checked);
2. 5-core: drop users with fewer than 5 ratings and movies with fewer than 5 ratings, repeated until every
   remaining user and movie has at least 5 (the usual filter of implicit-feedback benchmarks);
3. write ratings.csv.gz: user_id,item_id,rating,timestamp sorted by (user_id, timestamp, line in ratings.dat),
   gzip with mtime 0; movies.csv: item_id,title,genres of the kept movies, sorted by item_id.
User ids are MovieTweetings' own (1..N); users.dat (their Twitter account ids) is not copied. Item ids are
IMDb title numbers (tt<id>), kept as 7-digit strings.

    python scripts/make_movietweetings_subset.py SNAPSHOT_DIR datasets/movietweetings [--core 5]
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
from pathlib import Path


def read_ratings(path: Path) -> list[tuple[int, str, int, int, int]]:
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        u, i, r, t = line.split("::")
        rows.append((int(u), i, int(r), int(t), line_no))
    pairs = {(u, i) for u, i, *_ in rows}
    if len(pairs) != len(rows):
        raise SystemExit(f"{path}: {len(rows) - len(pairs)} repeated (user, movie) pairs; this recipe expects none")
    return rows


def k_core(rows: list, k: int) -> list:
    while True:
        nu = collections.Counter(r[0] for r in rows)
        ni = collections.Counter(r[1] for r in rows)
        kept = [r for r in rows if nu[r[0]] >= k and ni[r[1]] >= k]
        if len(kept) == len(rows):
            return kept
        rows = kept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("snapshot", type=Path, help="folder with ratings.dat and movies.dat")
    ap.add_argument("out", type=Path)
    ap.add_argument("--core", type=int, default=5)
    a = ap.parse_args()
    rows = k_core(read_ratings(a.snapshot / "ratings.dat"), a.core)
    rows.sort(key=lambda r: (r[0], r[3], r[4]))
    a.out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["user_id", "item_id", "rating", "timestamp"])
    w.writerows((u, i, r, t) for u, i, r, t, _ in rows)
    with open(a.out / "ratings.csv.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                                    filename="") as gz:
        gz.write(text.getvalue().encode("utf-8"))
    items = {r[1] for r in rows}
    movies = {}
    for line in (a.snapshot / "movies.dat").read_text(encoding="utf-8").splitlines():
        mid, title, genres = (line.split("::") + ["", ""])[:3]
        if mid in items:
            movies[mid] = (title, genres)
    with open(a.out / "movies.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["item_id", "title", "genres"])
        for mid in sorted(items):
            title, genres = movies.get(mid, ("", ""))
            w.writerow([mid, title, genres])
    users = {r[0] for r in rows}
    print(f"{len(rows):,} ratings, {len(users):,} users, {len(items):,} movies "
          f"({len(rows) / len(users) / len(items):.4%} dense); {sum(1 for m in items if m not in movies)} "
          f"without a title -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
