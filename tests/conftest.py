import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LAMINA_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _fixed_threads():
    # Same thread count in every test: CPU reductions are then repeatable bit for bit.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(False)


def needs_shared(rel: str):
    path = SHARED_DATA / rel
    return pytest.mark.skipif(not path.exists(), reason=f"needs ../shared/data/{rel} (absent here)")


# A string a tiny character-level LM can learn by heart: test_gpt, test_llama and test_rnn overfit it.
REPEATED_TEXT = "hello lamina! " * 40
REPEATED_CHARS = sorted(set(REPEATED_TEXT))  # the vocabulary: vocab_size=len(REPEATED_CHARS)


def overfit_repeated_text(model, opt, steps: int, window: int) -> float:
    """Train a char-level LM on REPEATED_TEXT for `steps` steps: each a batch of 16 random windows of `window`
    next-token pairs (start offsets from a Generator seeded 0), cross-entropy, one opt step. Returns the last
    batch's loss."""
    import torch.nn.functional as F

    data = torch.tensor([REPEATED_CHARS.index(c) for c in REPEATED_TEXT])
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        start = torch.randint(0, len(data) - window - 1, (16,), generator=g)
        batch = torch.stack([data[s:s + window + 1] for s in start])  # (16, window + 1)
        x, y = batch[:, :-1], batch[:, 1:]
        loss = F.cross_entropy(model(x).reshape(-1, len(REPEATED_CHARS)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def greedy_text(model, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (characters of REPEATED_CHARS) by a char-level LM, prompt included."""
    from lamina.models import generate

    out = generate(model, torch.tensor([[REPEATED_CHARS.index(c) for c in prompt]]), max_new_tokens, greedy=True)
    return "".join(REPEATED_CHARS[i] for i in out[0].tolist())


def scramble(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from init, norm weights and biases far from 1 / 0: logits of order 1 that depend on every
    parameter (parity tests against reference implementations)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # a tied tensor is visited once
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if p.dim() == 1 else 0.15 * noise)


# ----- one trained digits run, shared by every test that needs "a real trained run" -------------------------
# The default job (small_cnn on digits) cut to 4 epochs (~1-2 s on one thread), with a normalize augment so the
# tools that must undo it (export metadata, pixel-space explanations) are exercised too. Session scope: trained
# once per xdist worker. Read-only: a test that writes into a run folder copies it first (`digits_run_copy`,
# or `copy_run` into a module's own tmp folder).
DIGITS_RUN_ARGS = ["trainer.max_epochs=4", "trainer.threads=1", "trainer.progress=false", "logging.tensorboard=false",
                   "data.augment=[{name: normalize, mean: 0.3, std: 0.4}]", "name=digits"]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    import lamina

    root = tmp_path_factory.mktemp("shared_runs")
    n = torch.get_num_threads()
    try:
        run = lamina.train(lamina.load_config(None, [*DIGITS_RUN_ARGS, f"logging.root={root}"])).run_dir
    finally:
        torch.set_num_threads(n)  # trainer.threads=1 must not leak into the tests that follow on this worker
    return Path(run)


def copy_run(run: Path, dst: Path) -> Path:
    """A private, writable copy of a run folder at `dst` (which must not exist); returns `dst`."""
    import shutil

    shutil.copytree(run, dst)
    return dst


@pytest.fixture()
def digits_run_copy(digits_run, tmp_path) -> Path:
    """A private copy of the shared digits run, for tests that write into the run folder."""
    return copy_run(digits_run, tmp_path / "digits")


def make_facts(name: str = "toy", task: str = "toy", input_shape=(), num_outputs=None, num_classes=None,
               meta=None, class_names=None):
    """Typed data facts for task unit tests (a run builds them from its DataBundle)."""
    from lamina.data.facts import DataFacts

    return DataFacts(name=name, task=task, input_shape=tuple(input_shape),
                     num_outputs=int(num_outputs if num_outputs is not None else num_classes or 0),
                     num_classes=num_classes, class_names=class_names, meta=dict(meta or {}))
