"""Build datasets/thyroid0387/thyroid.csv.gz from the UCI "Thyroid Disease" archive file thyroid0387.data.

    python scripts/make_thyroid_table.py PATH/TO/thyroid0387.data [--out datasets/thyroid0387/thyroid.csv.gz]

The UCI file has one record a line: 29 attribute values, then the diagnosis with the record id in brackets
("29,F,f,...,other,-[840801013]"), '?' for an unknown value (some copies are tab-separated without the record id,
or carry an added header line; both are read). The table written here keeps every one of the 9,172 records in
the file's order (by record id: yymmdd + a 3-digit serial, 1984-08 .. 1987-01), with:

* record_id (int; absent in copies without it), the 29 attributes under the names of thyroid0387.names
  (snake_case), missing values as empty cells;
* diagnosis: the archive's diagnosis string ("-" = no condition, "X|Y" = consistent with X, more likely Y);
* hyperthyroid: 1 when the (more likely) diagnosis holds a hyperthyroid condition (letters A hyperthyroid,
  B T3 toxic, C toxic goitre, D secondary toxic; the archive's first group of comments), else 0.

The rows are not resampled or filtered: the positive rate is the archive's own (228 of 9,172, 2.49%).
The gzip header carries no timestamp (mtime=0), so the output is the same bytes on every run.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import re
from pathlib import Path

ATTRIBUTES = ["age", "sex", "on_thyroxine", "query_on_thyroxine", "on_antithyroid_medication", "sick", "pregnant",
              "thyroid_surgery", "I131_treatment", "query_hypothyroid", "query_hyperthyroid", "lithium", "goitre",
              "tumor", "hypopituitary", "psych", "TSH_measured", "TSH", "T3_measured", "T3", "TT4_measured", "TT4",
              "T4U_measured", "T4U", "FTI_measured", "FTI", "TBG_measured", "TBG", "referral_source"]
HYPER = set("ABCD")
_LAST = re.compile(r"^(?P<diag>[^\[]*)(\[(?P<id>\d+)\])?$")


def positive(diagnosis: str) -> int:
    """1 when the more likely diagnosis ("X|Y" -> Y) names a hyperthyroid condition (A, B, C or D)."""
    likely = diagnosis.split("|")[-1]
    return int(any(c in HYPER for c in likely))


def parse(text: str) -> list[dict]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("age,") or line.startswith("age\t"):  # an added header line
            continue
        cells = re.split(r"[,\t]", line)
        if len(cells) != len(ATTRIBUTES) + 1:
            raise SystemExit(f"line {n}: expected {len(ATTRIBUTES) + 1} fields, got {len(cells)}")
        m = _LAST.match(cells[-1])
        if m is None:
            raise SystemExit(f"line {n}: cannot read the diagnosis field {cells[-1]!r}")
        row = {"record_id": m.group("id") or ""}
        row.update({a: ("" if v == "?" else v) for a, v in zip(ATTRIBUTES, cells[:-1])})
        row["diagnosis"] = m.group("diag")
        row["hyperthyroid"] = positive(m.group("diag"))
        rows.append(row)
    return rows


def write(rows: list[dict], out: Path) -> None:
    cols = (["record_id"] if rows[0]["record_id"] else []) + ATTRIBUTES + ["diagnosis", "hyperthyroid"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(buf.getvalue().encode())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="thyroid0387.data from the UCI Thyroid Disease archive")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "datasets/thyroid0387/thyroid.csv.gz"))
    a = ap.parse_args()
    rows = parse(Path(a.data).read_text())
    pos = sum(r["hyperthyroid"] for r in rows)
    write(rows, Path(a.out))
    print(f"{a.out}: {len(rows)} records, {pos} hyperthyroid ({100 * pos / len(rows):.2f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
