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
