"""pyproject.toml's extras: `all` names every optional feature extra, so `pip install "lamina[all]"` is the whole
toolkit (the `test` and `bench` extras are tools for developers, not features)."""

import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
DEV_EXTRAS = {"test", "bench", "all"}


def test_all_extra_covers_every_feature_extra():
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    (spec,) = extras["all"]
    m = re.fullmatch(r"lamina\[([a-z0-9_,\-]+)\]", spec)
    assert m, f"`all` should be a single self-reference lamina[...], got {spec!r}"
    named = set(m.group(1).split(","))
    assert named == set(extras) - DEV_EXTRAS, (sorted(set(extras) - DEV_EXTRAS - named), sorted(named - set(extras)))


def test_test_extra_installs_what_the_feature_extras_need():
    """The suite exercises every feature, so the test extra holds each feature extra's packages."""
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    name = lambda req: re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()  # noqa: E731
    test = {name(r) for r in extras["test"]}
    missing = {e: sorted({name(r) for r in reqs} - test) for e, reqs in extras.items() if e not in DEV_EXTRAS}
    allowed = {"rl": ["box2d"]}  # LunarLander's physics: its tests skip without it (a C++ build)
    assert {e: m for e, m in missing.items() if m and m != allowed.get(e)} == {}
