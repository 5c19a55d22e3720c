"""Multimodal family: CLIP-style dual encoder + contrastive task, fusion classifier + fusion task, their data sets.

Hand-computed InfoNCE, the logit-scale cap, prompt ensembling, zero-shot classification by a tiny model trained
here, every modality subset of the fusion classifier, modality dropout (train mode only), padding invariance of
the audio encoder, the data sets' splits and pairings, and short end-to-end runs through the runner.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lamina.errors import ConfigError, DataError, InputShapeError, ModelError
from lamina.models import create_model
from lamina.tasks import TASKS
from lamina.tasks.contrastive import ContrastiveOutput, ContrastiveTask, info_nce, retrieval_hits
from lamina.tasks.fusion import FusionTask, proper_subsets

from conftest import SHARED_DATA, needs_shared, make_facts

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_file(), reason="needs the Debian package dataset-fashion-mnist")


def tiny_clip(**kw):
    opts = dict(vocab_size=12, max_len=8, text_width=32, text_layers=1, text_heads=2, embed_dim=16,
                image_options={"channels": (8, 16)})
    return create_model("clip_tiny", **{**opts, **kw})


def tiny_fusion(**kw):
    opts = dict(num_classes=5, width=32, vocab_size=12, max_len=8, text_width=16, n_mels=6, audio_channels=(8, 8),
                image_options={"channels": (8, 16)})
    return create_model("fusion_classifier", **{**opts, **kw})


# ---------------------------------------------------------------------------------------- InfoNCE


def test_info_nce_equals_hand_computed_3x3():
    L = [[3.0, 1.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 1.0]]
    e = math.exp
    rows = [-math.log(e(3) / (e(3) + e(1) + e(0))),  # image 0 -> caption 0 among (3, 1, 0)
            -math.log(e(2) / (e(0) + e(2) + e(0))),
            -math.log(e(1) / (e(1) + e(0) + e(1)))]
    cols = [-math.log(e(3) / (e(3) + e(0) + e(1))),  # caption 0 -> image 0 among column (3, 0, 1)
            -math.log(e(2) / (e(1) + e(2) + e(0))),
            -math.log(e(1) / (e(0) + e(0) + e(1)))]
    want = 0.5 * (sum(rows) / 3 + sum(cols) / 3)
    assert want == pytest.approx(0.40005, abs=1e-5)  # rows 0.42380, columns 0.37629
    assert info_nce(torch.tensor(L)).item() == pytest.approx(want, rel=1e-6)
    # the task computes the same from embeddings: s * img @ txt.T with orthonormal text embeddings
    img = torch.tensor(L) / 10.0
    out = ContrastiveOutput(img, torch.eye(3), torch.tensor(10.0))
    assert ContrastiveTask().loss(out, {}).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(DataError, match=r"square \(B, B\)"):
        info_nce(torch.zeros(2, 3))


def test_retrieval_hits_instance_and_class_aware():
    logits = torch.tensor([[5.0, 1.0, 0.0], [4.0, 1.0, 0.0], [0.0, 0.0, 3.0]])  # row 1 retrieves caption 0
    assert retrieval_hits(logits).tolist() == [True, False, True]
    assert retrieval_hits(logits, torch.tensor([7, 7, 2])).tolist() == [True, True, True]  # same class counts


# ---------------------------------------------------------------------------------------- dual encoder


def test_logit_scale_starts_at_clip_value_and_is_capped_at_100():
    torch.manual_seed(0)
    model = tiny_clip()
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    x = model.example_inputs(3)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    model.eval()
    assert model.scale().item() == pytest.approx(100.0)
    lpi, lpt = model(**x)
    cos = model.encode_image(x["image"]) @ model.encode_text(x["text"], x["text_mask"]).t()
    torch.testing.assert_close(lpi, 100.0 * cos)
    torch.testing.assert_close(lpt, lpi.t())
    info_nce(lpi).backward()
    assert model.logit_scale.grad.item() == 0.0  # beyond the cap: no gradient pushes it further
    model.zero_grad()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    info_nce(model(**x)[0]).backward()
    assert model.logit_scale.grad.item() != 0.0
    with pytest.raises(ModelError, match="init_temperature must be in"):
        tiny_clip(init_temperature=0.001)


def test_text_tower_ignores_padding_and_embeddings_are_unit_norm():
    torch.manual_seed(0)
    model = tiny_clip().eval()
    ids = torch.tensor([[5, 6, 7, 3]])
    padded = torch.tensor([[5, 6, 7, 3, 0, 0, 0]])
    a = model.encode_text(ids)
    b = model.encode_text(padded)  # mask defaults to ids != pad_id
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(1))
    eos = tiny_clip(text_pool="eos").eval()
    torch.testing.assert_close(eos.encode_text(ids), eos.encode_text(padded), rtol=1e-5, atol=1e-6)


def test_dual_encoder_input_errors_are_one_line():
    model = tiny_clip()
    x = model.example_inputs(2)
    with pytest.raises(InputShapeError, match=r"text as token ids of shape \(B, L\) and dtype int64, got float32"):
        model(x["image"], x["text"].float())
    with pytest.raises(InputShapeError, match=r"token id 12 is outside the vocabulary \[0, 12\)"):
        model(x["image"], torch.full((2, 3), 12))
    with pytest.raises(InputShapeError, match=r"expects image of shape \(B, 1, H, W\)"):
        model(x["image"].repeat(1, 3, 1, 1), x["text"])
    with pytest.raises(InputShapeError, match="handles at most max_len=8 tokens, got 9"):
        model(x["image"], torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(InputShapeError, match="3 images but 2 texts"):
        model(torch.rand(3, 1, 8, 8), x["text"])
    with pytest.raises(ModelError, match="image_tower must be an image model"):
        tiny_clip(image_tower="gpt")


def test_zero_shot_classifier_is_the_normalised_mean_of_normalised_prompts():
    torch.manual_seed(0)
    model = tiny_clip().eval()
    p0 = torch.tensor([[4, 5, 3, 0], [6, 5, 7, 3]])  # class 0: two prompts (one padded)
    p1 = torch.tensor([[8, 9, 3]])  # class 1: one prompt
    classes = model.zero_shot_classifier([p0, p1])
    e0 = model.encode_text(p0)
    want0 = F.normalize(e0.mean(0), dim=0)
    torch.testing.assert_close(classes[0], want0)
    torch.testing.assert_close(classes[1], model.encode_text(p1)[0])
    with pytest.raises(InputShapeError, match="prompts for at least one class"):
        model.zero_shot_classifier([])


def _synthetic_pairs(n: int, g: torch.Generator):
    """4 classes; image: one bright 4x4 quadrant of an 8x8 image + noise; caption: <adj> <class word> </s>."""
    y = torch.randint(0, 4, (n,), generator=g)
    img = 0.2 * torch.rand(n, 1, 8, 8, generator=g)
    for c in range(4):
        r, col = divmod(c, 2)
        img[y == c, :, 4 * r:4 * r + 4, 4 * col:4 * col + 4] += 1.0
    adj = torch.randint(5, 7, (n,), generator=g)  # training "templates": word 5 or 6 before the class word
    text = torch.stack([adj, 8 + y, torch.full_like(y, 3)], 1)
    return img, text, y


def test_zero_shot_picks_the_right_class_after_training_a_tiny_clip():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = tiny_clip()
    task = ContrastiveTask(prompts={"ids": [[7, 8 + c, 3] for c in range(4)] + [[8 + c, 3, 0] for c in range(4)],
                                    "lens": [3] * 4 + [2] * 4, "class": list(range(4)) * 2}, label_smoothing=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        img, text, y = _synthetic_pairs(32, g)
        loss = task.loss(task.forward(model, {"image": img, "text": text}), {})
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    img, text, y = _synthetic_pairs(200, g)
    batch = {"image": img, "text": text, "text_len": torch.full_like(y, 3), "y": y}
    with torch.no_grad():
        out = task.forward(model, batch)  # held-out prompts: word 7 never preceded a class word in training
        metrics = task.make_metrics()
        task.update_metrics(metrics, out, batch)
        m = {k: float(v) for k, v in metrics.compute().items()}
    assert out.zero_shot.shape == (200, 4)
    assert (out.zero_shot.argmax(-1) == y).float().mean() >= 0.95
    assert m["zero_shot_acc"] >= 0.95 and m["i2t_top1"] >= 0.95
    assert task.predict(out)["label"].shape == (200,)


# ---------------------------------------------------------------------------------------- fusion


def fusion_inputs(model, batch=4):
    torch.manual_seed(1)
    return model.example_inputs(batch)


@pytest.mark.parametrize("fusion", ["mean", "attention"])
def test_fusion_accepts_every_non_empty_subset(fusion):
    torch.manual_seed(0)
    model = tiny_fusion(fusion=fusion)
    x = fusion_inputs(model)
    names = ("image", "text", "audio")
    for train in (False, True):
        model.train(train)
        for r in range(1, 4):
            for subset in itertools.combinations(names, r):
                kw = {k: v for k, v in x.items() if k.split("_")[0] in subset}
                out = model(**kw)
                assert out.shape == (4, 5) and torch.isfinite(out).all(), subset
    with pytest.raises(InputShapeError) as err:
        model()
    assert str(err.value) == ("input error: model fusion_classifier got no input; pass at least one of "
                              "image, text, audio")


def test_fusion_errors_name_the_problem():
    model = tiny_fusion(modalities=("image", "audio"))
    x = fusion_inputs(tiny_fusion())
    with pytest.raises(InputShapeError, match="has no text encoder; its modalities are image, audio"):
        model(image=x["image"], text=x["text"])
    with pytest.raises(InputShapeError, match=r"modalities differ in batch size: \{'image': 4, 'audio': 3\}"):
        model(image=x["image"], audio=x["audio"][:3])
    with pytest.raises(InputShapeError, match=r"audio as log-mel frames of shape \(B, T, 6\)"):
        model(audio=x["audio"][..., :5])
    with pytest.raises(InputShapeError, match="audio_mask given without audio"):
        model(image=x["image"], audio_mask=x["audio_mask"])
    with pytest.raises(ModelError, match="unknown fusion modality 'video'"):
        tiny_fusion(modalities=("image", "video"))
    with pytest.raises(ModelError, match="modalities must name at least one"):
        tiny_fusion(modalities=())


def test_mean_fusion_is_the_mean_of_the_projected_modalities():
    torch.manual_seed(0)
    model = tiny_fusion().eval()
    x = fusion_inputs(model)
    with torch.no_grad():
        img = model._encode("image", x["image"], None)
        aud = model._encode("audio", x["audio"], x["audio_mask"])
        feats = model.forward_features(image=x["image"], audio=x["audio"], audio_mask=x["audio_mask"])
    torch.testing.assert_close(feats, (img + aud) / 2)
    torch.testing.assert_close(model.forward_head(feats), model(image=x["image"], audio=x["audio"],
                                                                audio_mask=x["audio_mask"]))


def test_modality_dropout_only_in_train_mode():
    torch.manual_seed(0)
    model = tiny_fusion(modality_dropout=0.5)
    model.eval()
    assert model.modality_keep(1000, 3).all()
    model.train()
    keep = model.modality_keep(4000, 3)
    assert keep.any(1).all()  # every sample keeps at least one modality
    # P(kept) = 0.5 + P(all three dropped) * 1/3 = 0.5 + 0.125 / 3
    assert keep.float().mean().item() == pytest.approx(0.5 + 0.125 / 3, abs=0.02)
    assert model.modality_keep(10, 1).all()  # a single modality is never dropped
    # whole model: encoders and head in eval (BN, dropout off) so only modality dropout differs
    x = fusion_inputs(model, batch=64)
    model.eval()
    with torch.no_grad():
        ref = model(**x)
        torch.testing.assert_close(model(**x), ref)  # eval: deterministic, nothing dropped
        model.train()
        model.encoders.eval()
        model.drop.eval()
        dropped = model(**x)
    assert not torch.allclose(dropped, ref)
    no_drop = tiny_fusion(modality_dropout=0.0)
    no_drop.load_state_dict(model.state_dict())
    no_drop.train()
    no_drop.encoders.eval()
    no_drop.drop.eval()
    with torch.no_grad():
        torch.testing.assert_close(no_drop(**x), ref)


def test_audio_encoder_output_does_not_depend_on_padding():
    torch.manual_seed(0)
    model = tiny_fusion().eval()
    audio = torch.randn(1, 13, 6)
    padded = torch.cat([audio, torch.zeros(1, 10, 6)], 1)
    mask = torch.arange(23)[None] < 13
    with torch.no_grad():
        torch.testing.assert_close(model(audio=audio), model(audio=padded, audio_mask=mask))
        assert not torch.allclose(model(audio=audio), model(audio=padded))  # unmasked padding is real signal


# ---------------------------------------------------------------------------------------- tasks


def test_tasks_are_registered_and_reject_unknown_options():
    assert TASKS["contrastive"] is ContrastiveTask and TASKS["fusion"] is FusionTask
    with pytest.raises(ConfigError, match="task.beam_size: unknown option of task fusion 'beam_size'"):
        FusionTask.from_facts(make_facts(num_classes=10, meta={"modalities": ["image"]}), {"beam_size": 4})
    with pytest.raises(ConfigError, match="task.topk: unknown option of task contrastive 'topk'"):
        ContrastiveTask.from_facts(make_facts(num_classes=10), {"topk": 4})
    assert proper_subsets(("image", "text", "audio")) == [
        ("image",), ("text",), ("audio",), ("image", "text"), ("image", "audio"), ("text", "audio")]


def test_fusion_task_reports_accuracy_per_modality_subset():
    torch.manual_seed(0)
    model = tiny_fusion().eval()
    task = FusionTask(5, ("image", "text", "audio"), label_smoothing=0.1)
    x = fusion_inputs(model)
    batch = {"image": x["image"], "text": x["text"], "text_len": x["text_mask"].sum(1),
             "audio": x["audio"], "audio_len": x["audio_mask"].sum(1), "y": torch.tensor([0, 1, 2, 3])}
    with torch.no_grad():
        out = task.forward(model, batch)
        metrics = task.make_metrics()
        task.update_metrics(metrics, out, batch)
    assert len(out) == 4 and set(out.subsets) == {"image", "text", "audio", "image_text", "image_audio", "text_audio"}
    torch.testing.assert_close(out.subsets["audio"], model(audio=x["audio"], audio_mask=x["audio_mask"]))
    want = (model(audio=x["audio"], audio_mask=x["audio_mask"]).argmax(-1) == batch["y"]).float().mean()
    assert float(metrics.compute()["acc_audio"]) == pytest.approx(float(want))
    model.train()
    assert task.forward(model, batch).subsets == {}  # training: one forward, all modalities
    with pytest.raises(DataError, match="the batch has no 'audio' tensor"):
        task.forward(model, {k: v for k, v in batch.items() if not k.startswith("audio")})


def test_check_model_rejects_the_wrong_model():
    facts = make_facts(name="fsdd_fusion", meta={"modalities": ["image", "audio"]})
    with pytest.raises(ConfigError, match="fusion needs fusion_classifier"):
        FusionTask.check_model(create_model("small_cnn"), facts)
    with pytest.raises(ConfigError, match="has no audio encoder"):
        FusionTask.check_model(tiny_fusion(modalities=("image",)), facts)
    with pytest.raises(ConfigError, match="contrastive training needs clip_tiny or clip_small"):
        ContrastiveTask.check_model(tiny_fusion(), facts)


# ---------------------------------------------------------------------------------------- data sets


@pytest.fixture(scope="module")
def fsdd_noisy():
    """fsdd_fusion with every modality and 30% wrong words, loaded once (3,000 WAV files -> log-mel)."""
    if not (SHARED_DATA / "fsdd" / "recordings").exists():
        pytest.skip("needs ../shared/data/fsdd/recordings (absent here)")
    from lamina.data import load_dataset

    return load_dataset("fsdd_fusion", text_noise=0.3, path=SHARED_DATA / "fsdd")


def test_fsdd_fusion_standard_split_and_pairing(fsdd_noisy):
    from lamina.data.multimodal import DIGIT_WORDS

    b = fsdd_noisy
    assert (len(b.train), len(b.val), len(b.test)) == (2400, 300, 300)  # 6 speakers x 10 digits x (40, 5, 5)
    assert b.task == "fusion" and b.meta["modalities"] == ["image", "text", "audio"]
    for split in (b.train, b.val, b.test):
        t = split.tensors
        assert torch.bincount(t["y"], minlength=10).tolist() == [len(split) // 10] * 10
        assert t["audio"].shape[1:] == (94, 40) and (t["audio_len"] <= 94).all()
        pad = torch.arange(94)[None] >= t["audio_len"][:, None]
        assert (t["audio"][pad] == 0).all()  # padding frames are zeros
    # train statistics standardise the train frames
    tr = b.train.tensors
    valid = torch.arange(94)[None] < tr["audio_len"][:, None]
    assert tr["audio"][valid].mean(0).abs().max() < 1e-3 and (tr["audio"][valid].std(0) - 1).abs().max() < 1e-2
    # images show the recording's digit (sklearn digits) and test images never occur in training
    from sklearn.datasets import load_digits

    raw = load_digits()
    lookup = {tuple((torch.from_numpy(im) / 16).flatten().tolist()): int(c) for im, c in zip(raw.images, raw.target)}
    for split in (b.train, b.test):
        labels = [lookup[tuple(im.flatten().tolist())] for im in split.tensors["image"]]
        assert labels == split.y.tolist()
    train_imgs = {tuple(im.flatten().tolist()) for im in b.train.tensors["image"]}
    assert not any(tuple(im.flatten().tolist()) in train_imgs for im in b.test.tensors["image"])
    # text: the digit's word, 30% swapped for another digit's word
    vocab = b.meta["vocab"]
    shown = [DIGIT_WORDS.index(vocab[int(i)]) for i in tr["text"][:, 0]]
    wrong = (torch.tensor(shown) != tr["y"]).float().mean().item()
    assert wrong == pytest.approx(0.3, abs=0.03)


@needs_shared("fsdd/recordings")
def test_fsdd_fusion_options_and_errors():
    from lamina.data import load_dataset

    path = SHARED_DATA / "fsdd"
    b = load_dataset("fsdd_fusion", path=path, modalities=["text", "image"], split="speaker", test_speaker="george")
    assert set(b.train.tensors) == {"image", "text", "text_len", "y"} and b.meta["modalities"] == ["image", "text"]
    assert b.meta["speakers"]["test"] == ["george"] and "george" not in b.meta["speakers"]["train"]
    assert len(b.test) == 500 and len(b.val) == 250
    assert FusionTask.model_options(make_facts(num_classes=10, meta=b.meta)) == {
        "num_classes": 10, "modalities": ("image", "text"), "in_chans": 1, "vocab_size": 15, "max_len": 1}
    with pytest.raises(DataError, match="modalities is empty"):
        load_dataset("fsdd_fusion", path=path, modalities=[])
    with pytest.raises(DataError, match="unknown modality 'video'"):
        load_dataset("fsdd_fusion", path=path, modalities=["video"])
    with pytest.raises(DataError, match="unknown test_speaker 'bob'"):
        load_dataset("fsdd_fusion", path=path, split="speaker", test_speaker="bob")
    with pytest.raises(DataError, match="unknown split 'random'"):
        load_dataset("fsdd_fusion", path=path, split="random")
    with pytest.raises(DataError, match="FSDD recordings not found"):
        load_dataset("fsdd_fusion", path=path / "nowhere")


def test_caption_vocabulary_covers_the_held_out_prompts():
    from lamina.data.multimodal import (FASHION_NAMES, PROMPT_TEMPLATES, TRAIN_TEMPLATES, caption_vocab, fill,
                                        words)

    assert not set(PROMPT_TEMPLATES) & set(TRAIN_TEMPLATES)
    vocab = caption_vocab()
    for t in PROMPT_TEMPLATES:
        for names in FASHION_NAMES:
            for n in names:
                assert 1 not in vocab.encode(fill(t, n)), fill(t, n)  # no <unk>
    assert fill("a photo of a {}.", "ankle boot") == "a photo of an ankle boot."
    assert words("A T-shirt, seen.") == ["a", "t", "-", "shirt", ",", "seen", "."]


@needs_fmnist
def test_fashion_captions_pairs_and_prompts():
    from lamina.data import load_dataset
    from lamina.data.multimodal import FASHION_NAMES, PROMPT_TEMPLATES, TRAIN_TEMPLATES, WordVocab, fill

    b = load_dataset("fashion_captions", limit=600)
    assert b.task == "contrastive" and len(b.test) == 10000
    vocab = WordVocab(b.meta["vocab"])
    train_caps = {fill(t, n) for t in TRAIN_TEMPLATES for ns in FASHION_NAMES for n in ns}
    heldout_caps = {fill(t, n) for t in PROMPT_TEMPLATES for ns in FASHION_NAMES for n in ns}

    def text_of(split, i):
        t = split.tensors
        ids = t["text"][i, :t["text_len"][i]].tolist()
        assert ids[-1] == 3  # </s>
        return vocab.decode(ids)

    norm = lambda s: " ".join(vocab.decode(vocab.encode(s)).split())  # noqa: E731
    train_norm, held_norm = {norm(c) for c in train_caps}, {norm(c) for c in heldout_caps}
    for i in range(50):
        cap = text_of(b.train, i)
        assert cap in train_norm
        assert any(norm(n) in cap for n in FASHION_NAMES[int(b.train.y[i])])  # names the image's class
        assert text_of(b.test, i) in held_norm
    p = b.meta["prompts"]
    assert len(p["ids"]) == len(PROMPT_TEMPLATES) * sum(len(n) for n in FASHION_NAMES)
    assert sorted(set(p["class"])) == list(range(10)) and b.meta["pad_trim"] == {"text": "text_len"}
    assert ContrastiveTask.model_options(make_facts(meta=b.meta, input_shape=[1, 28, 28])) == {
        "vocab_size": len(vocab), "max_len": b.meta["max_len"], "in_chans": 1}


# ---------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
@needs_shared("fsdd/recordings")
def test_fusion_trains_from_a_config_and_beats_chance(tmp_path, monkeypatch):
    from lamina.config import validate
    from lamina.runs import train

    monkeypatch.setenv("LAMINA_SHARED_DATA", str(SHARED_DATA))
    cfg = validate({"name": "fusion", "seed": 0, "data": {"name": "fsdd_fusion", "batch_size": 64},
                    "model": {"name": "fusion_classifier"}, "optimizer": {"lr": 3e-3},
                    "trainer": {"max_epochs": 2, "threads": 1, "monitor": "val/acc", "monitor_mode": "max"},
                    "logging": {"root": str(tmp_path), "plots": False, "tensorboard": False}})
    res = train(cfg)
    test = res.summary["test"]
    assert test["test/acc"] > 0.9 and test["test/acc_text"] > 0.9  # clean words: text alone knows the digit
    assert 0.3 < test["test/acc_audio"] <= 1.0 and {"test/acc_image_audio", "test/f1_macro"} <= set(test)


@pytest.mark.slow
@needs_fmnist
def test_contrastive_trains_from_a_config(tmp_path):
    from lamina.config import validate
    from lamina.runs import train

    cfg = validate({"name": "clip", "seed": 0,
                    "data": {"name": "fashion_captions", "limit": 2000, "test_limit": 1000, "batch_size": 64,
                             "eval_batch_size": 1000},
                    "model": {"name": "clip_tiny", "image_options": {"channels": [16, 32]}},
                    "optimizer": {"lr": 2e-3}, "task": {"label_smoothing": 0.0},
                    "trainer": {"max_epochs": 4, "threads": 1, "monitor": "val/zero_shot_acc", "monitor_mode": "max"},
                    "logging": {"root": str(tmp_path), "plots": False, "tensorboard": False}})
    res = train(cfg)  # ~12 s of CPU; 0.57 zero-shot accuracy when written
    test = res.summary["test"]
    assert res.summary["data"]["test"] == 1000
    assert test["test/zero_shot_acc"] > 0.35  # chance is 0.1
    assert {"test/i2t_top1", "test/t2i_top1", "test/loss"} <= set(test)
    assert res.history[-1]["train/logit_scale"] > 0
