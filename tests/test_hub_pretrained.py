"""lamina's own pretrained folders: save_pretrained / from_pretrained round trips, strict loading."""

import json

import pytest
import torch

from lamina import hub
from lamina.errors import CheckpointError
from lamina.models import create_model


@pytest.mark.parametrize("name,kw,x", [
    ("gpt", dict(vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=16), torch.randint(0, 40, (2, 16))),
    ("small_cnn", dict(num_classes=10, in_chans=1, channels=(8, 16)), torch.randn(2, 1, 8, 8)),
    ("llama", dict(vocab_size=40, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, block_size=16),
     torch.randint(0, 40, (2, 16))),
])
def test_round_trip_gives_the_same_outputs(tmp_path, name, kw, x):
    torch.manual_seed(0)
    model = create_model(name, **kw).eval()
    hub.save_pretrained(model, tmp_path / "m", extra={"note": "fine-tuned"})
    meta = json.loads((tmp_path / "m" / "lamina_model.json").read_text())
    assert meta["model"] == name and meta["note"] == "fine-tuned"
    assert meta["params"] == sum(p.numel() for p in model.parameters())
    again = hub.from_pretrained(tmp_path / "m").eval()
    loaded, info = hub.load(tmp_path / "m")
    assert info["format"] == "lamina"
    with torch.no_grad():
        assert torch.equal(again(x), model(x)) and torch.equal(loaded.eval()(x), model(x))


def test_mismatched_weights_and_foreign_models_are_refused(tmp_path):
    model = create_model("gpt", vocab_size=40, n_layer=2, n_head=2, n_embd=32, block_size=16)
    hub.save_pretrained(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "lamina_model.json").read_text())
    assert meta["resolved"]["n_embd"] == meta["options"]["n_embd"] == 32  # every option is recorded, given or not
    meta["resolved"]["n_embd"] = 64  # the weights no longer fit
    (tmp_path / "m" / "lamina_model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit model gpt: .*shape mismatches"):
        hub.from_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not built by lamina.models.create_model"):
        hub.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(CheckpointError, match="not a lamina pretrained folder"):
        hub.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="neither a file, a folder nor an installed weights package"):
        hub.load("no-such-package-xyz")
