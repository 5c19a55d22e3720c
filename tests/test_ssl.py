"""Self-supervised learning: NT-Xent, BYOL's loss and EMA target, MAE's masked encoder, the SSL views, the probes,
`lamina pretrain` / `lamina probe`, and run folders (SSL encoders, masked-LM runs) as `model.pretrained` sources.

Numeric parts are checked against hand-written reference formulas or the model's own forward; end-to-end tests
pretrain small_cnn on the digits set (1,797 8x8 images) for a few seconds.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import needs_shared
from lamina.cli.main import main
from lamina.config import load_config
from lamina.data.transforms import ColorJitter, RandomResizedCrop, build_transforms
from lamina.errors import ConfigError
from lamina.models import create_model
from lamina.runs.objectives.ssl import BYOL, MAE, SimCLR, SSLTask, byol_loss, nt_xent, patchify
from lamina.runs.ssl import knn_accuracy, linear_probe

FAST = ["trainer.progress=false", "logging.tensorboard=false", "cost.energy=false", "data.batch_size=64",
        "trainer.max_epochs=2", "optimizer.name=adamw", "optimizer.lr=2e-3", "schedule.name=constant"]


# ----- losses ------------------------------------------------------------------------------------------------
def test_nt_xent_matches_the_formula_written_out():
    torch.manual_seed(0)
    z1, z2, t = torch.randn(4, 8), torch.randn(4, 8), 0.3
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for i in range(8):  # -log( exp(s_i,twin / t) / sum_{k != i} exp(s_ik / t) )
        twin = (i + 4) % 8
        num = math.exp(float(z[i] @ z[twin]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(8) if k != i)
        total += -math.log(num / den)
    loss, acc = nt_xent(z1, z2, t)
    assert loss.item() == pytest.approx(total / 8, rel=1e-5)
    same, acc_same = nt_xent(z1, z1 + 1e-3 * torch.randn(4, 8), t)  # twins almost equal: each finds its twin
    assert acc_same.item() == 1.0 and same.item() < loss.item()


def test_byol_loss_is_mse_of_normalised_vectors_and_stops_the_target_gradient():
    torch.manual_seed(0)
    p, z = torch.randn(5, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)
    ref = (F.normalize(p, dim=1) - F.normalize(z, dim=1)).pow(2).sum(1).mean()
    loss = byol_loss(p, z)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert p.grad is not None and z.grad is None


def test_byol_target_is_the_ema_of_the_online_network_with_the_cosine_schedule():
    torch.manual_seed(0)
    enc = create_model("mlp", num_classes=3, in_features=4, width=8, depth=1)
    byol = BYOL(enc, 16, 8, momentum=0.9, total_steps=10)
    assert byol.momentum() == pytest.approx(0.9)  # step 0: the base
    assert not any(p.requires_grad for p in byol.target_encoder.parameters())
    byol.update_target()  # step 0: nothing to follow yet, the copy stays
    with torch.no_grad():
        for p in byol.encoder.parameters():
            p.add_(1.0)
    before = [t.clone() for t in byol.target_encoder.parameters()]
    tau = byol.momentum()  # step 1: 1 - 0.1 * (cos(pi/10) + 1) / 2
    assert tau == pytest.approx(1 - 0.1 * (math.cos(math.pi / 10) + 1) / 2)
    byol.update_target()
    for t, b, o in zip(byol.target_encoder.parameters(), before, byol.encoder.parameters()):
        torch.testing.assert_close(t, tau * b + (1 - tau) * o)
    byol.step.fill_(10)
    assert byol.momentum() == pytest.approx(1.0)


def test_simclr_and_byol_train_the_encoder_and_heads_not_the_target():
    torch.manual_seed(0)
    for learner in (SimCLR(create_model("small_cnn", num_classes=10, in_chans=1), 32, 16, 0.5),
                    BYOL(create_model("small_cnn", num_classes=10, in_chans=1), 32, 16, 0.99, 100)):
        x1, x2 = torch.rand(8, 1, 16, 16), torch.rand(8, 1, 16, 16)
        learner(x1, x2)["loss"].backward()
        enc = learner.encoder
        head = {n for n, _ in enc.named_parameters() if n.startswith(("head", "fc", "classifier"))}
        body = [p for n, p in enc.named_parameters() if n not in head]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in body)
        assert all(p.grad is not None for p in learner.projector.parameters())
        if isinstance(learner, BYOL):
            assert all(p.grad is None for p in learner.target_encoder.parameters())


# ----- MAE ---------------------------------------------------------------------------------------------------
def test_patchify_orders_patches_as_the_patch_embedding_does():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    p = patchify(x, 4)  # (2, 4, 16)
    assert p.shape == (2, 4, 16)
    torch.testing.assert_close(p[1, 1], x[1, 0, 0:4, 4:8].reshape(-1))  # row 0, column 1
    torch.testing.assert_close(p[0, 2], x[0, 0, 4:8, 0:4].reshape(-1))  # row 1, column 0


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_mae_encoder_on_all_patches_equals_the_vit_forward(pool):
    """Keeping every patch in image order must reproduce the ViT's own forward_features exactly."""
    torch.manual_seed(0)
    vit = create_model("vit_fashion", depth=2, pool=pool).eval()
    mae = MAE(vit, 0.75, 32, 1, 4, True).eval()
    x = torch.rand(3, 1, 28, 28)
    keep = torch.arange(49).expand(3, -1)
    torch.testing.assert_close(mae.encode_visible(x, keep), vit.forward_features(x), rtol=1e-5, atol=1e-5)


def test_mae_scores_hidden_patches_only_and_learns():
    torch.manual_seed(0)
    vit = create_model("vit_fashion", depth=1)
    mae = MAE(vit, 0.75, 32, 1, 4, norm_pix=False)
    x = torch.rand(4, 1, 28, 28)
    noise = torch.rand(4, 49)
    n_keep = round(49 * 0.25)
    kept = noise.argsort(1)[:, :n_keep]
    # a decoder that predicts the target exactly on the kept patches but not on hidden ones changes nothing:
    # replace the prediction with the target everywhere except hidden patches -> loss is the hidden error only
    out = mae(x, noise)["loss"]
    with torch.no_grad():
        h = mae.encode_visible(x, kept)
    assert h.shape == (4, n_keep, 128) and out.item() > 0
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = mae(x, noise)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_mae_refuses_models_that_are_not_vits():
    with pytest.raises(ConfigError, match="needs a ViT-family model"):
        MAE(create_model("small_cnn", num_classes=10, in_chans=1), 0.75, 32, 1, 4, True)


# ----- views -------------------------------------------------------------------------------------------------
def test_resized_crop_identity_and_box_size():
    x = torch.rand(3, 1, 12, 12)
    ident = RandomResizedCrop(scale=(1, 1), ratio=(1, 1))({"x": x})["x"]
    torch.testing.assert_close(ident, x, rtol=0, atol=1e-5)
    cols = torch.arange(32.0).expand(2, 1, 32, 32).contiguous()  # pixel value = column index
    out = RandomResizedCrop(scale=(0.25, 0.25), ratio=(1, 1))({"x": cols}, torch.Generator().manual_seed(0))["x"]
    span = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))  # a box half as wide covers ~16 columns
    assert ((span > 14) & (span < 17)).all(), span
    assert build_transforms([{"name": "resized_crop", "scale": [0.2, 1.0]}]).transforms


def test_color_jitter_identity_bounds_and_contrast_keeps_the_mean():
    x = torch.rand(4, 1, 6, 6) * 0.5 + 0.25
    assert ColorJitter(0.0, 0.0, 1.0)({"x": x})["x"].equal(x)
    y = ColorJitter(0.0, 0.5, 1.0)({"x": x}, torch.Generator().manual_seed(0))["x"]
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    z = ColorJitter(1.0, 1.0, 1.0)({"x": torch.rand(16, 1, 6, 6)}, torch.Generator().manual_seed(1))["x"]
    assert z.min() >= 0 and z.max() <= 1


def test_ssl_task_views_are_seeded():
    cfg = load_config(None, ["ssl.method=simclr"]).ssl
    x = torch.rand(4, 1, 8, 8)
    seen = []
    for _ in range(2):
        task = SSLTask(cfg, seed=3)
        seen.append(task.views({"x": x}, task.generator)["x"])
    assert seen[0].equal(seen[1])


# ----- probes ------------------------------------------------------------------------------------------------
def test_knn_votes_by_cosine_similarity():
    f_train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    y_train = torch.tensor([0, 0, 1, 1])
    f_test = torch.tensor([[5.0, 0.5], [0.2, 3.0], [1.0, 1.1]])  # cosine ignores the norm
    assert knn_accuracy(f_train, y_train, f_test, torch.tensor([0, 1, 1]), k=1) == 1.0
    # k=3 on the third point: neighbours 3 (cls 1), 1 (cls 0), 2 (cls 1) -> class 1
    assert knn_accuracy(f_train, y_train, f_test[2:], torch.tensor([1]), k=3, temperature=1.0) == 1.0


def test_linear_probe_matches_scikit_learn():
    """Same objective as LogisticRegression(C=1) on StandardScaler features: the same test predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    g = torch.Generator().manual_seed(1)
    y = torch.arange(600) % 4
    f = torch.randn(600, 12, generator=g) + 0.8 * F.one_hot(y, 12).float() @ torch.randn(12, 12, generator=g)
    ours = linear_probe(f[:400], y[:400], f[400:], y[400:])
    sc = StandardScaler().fit(f[:400].numpy())
    ref = LogisticRegression(C=1.0, max_iter=5000, tol=1e-8).fit(sc.transform(f[:400].numpy()), y[:400].numpy())
    ref_acc = float((ref.predict(sc.transform(f[400:].numpy())) == y[400:].numpy()).mean())
    assert 0.4 < ours and abs(ours - ref_acc) <= 1 / 200  # at most one of 200 test points decided differently


def test_linear_probe_separates_separable_features_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    f = torch.randn(300, 5, generator=g) * 0.1 + F.one_hot(y, 5).float()
    assert linear_probe(f[:200], y[:200], f[200:], y[200:]) == 1.0
    noise = torch.randn(300, 5, generator=g)
    assert linear_probe(noise[:200], y[:200], noise[200:], y[200:]) < 0.6


# ----- end to end --------------------------------------------------------------------------------------------
def test_pretrain_probe_and_finetune_from_the_ssl_run(tmp_path, capsys):
    out = tmp_path / "simclr"
    rc = main(["pretrain", *FAST, f"logging.root={tmp_path}", "ssl.method=simclr", "--out", str(out), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["steps"] == 2 * (res["images"] // 64) and res["history"][-1]["train/loss"] < res["history"][0]["train/loss"] + 1
    ssl = json.loads((out / "ssl.json").read_text())
    assert 0.5 < ssl["probe"]["linear_probe"] <= 1 and 0.3 < ssl["probe"]["knn"] <= 1
    rc = main(["probe", str(out), "--json"])
    probed = json.loads(capsys.readouterr().out.strip())
    assert rc == 0 and probed["linear_probe"] == pytest.approx(ssl["probe"]["linear_probe"], abs=1e-9)
    rc = main(["probe", str(out), "--random", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out.strip())["random"] is True

    # the SSL run is a pretrained source: the fine-tuned model starts from its encoder (all but the new head)
    from lamina.runs.build import build_run_model, data_facts, load_data, task_class
    from lamina.runs.open import open_run

    encoder = open_run(out).model.state_dict()
    cfg = load_config(None, [*FAST, f"model.pretrained={out}"])
    bundle = load_data(cfg)
    model = build_run_model(cfg, data_facts(bundle, task_class(cfg, bundle)))
    state = model.state_dict()
    shared = [k for k in encoder if not k.startswith("head")]
    assert shared and all(torch.equal(state[k], encoder[k]) for k in shared)
    rc = main(["train", *FAST, f"logging.root={tmp_path}", f"model.pretrained={out}", "data.train_fraction=0.1"])
    assert rc == 0


def test_byol_and_mae_pretrain_end_to_end(tmp_path, capsys):
    for method, model in (("byol", "small_cnn"), ("mae", "vit_fashion")):
        extra = ["model.img_size=8", "model.patch_size=2", "model.depth=2"] if method == "mae" else []
        rc = main(["pretrain", *FAST, "trainer.max_epochs=1", f"logging.root={tmp_path}", f"ssl.method={method}",
                   f"model.name={model}", *extra, "--out", str(tmp_path / method), "--no-probe", "--json"])
        assert rc == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["method"] == method and math.isfinite(res["history"][-1]["train/loss"])
        rc = main(["eval", str(tmp_path / method), "--json"])  # an SSL run is a run: its encoder loads
        assert rc == 0
        capsys.readouterr()


@pytest.mark.parametrize("args,expect", [
    (["ssl.method=none"], "needs a method"),
    (["ssl.method=mae"], "needs a ViT-family model"),
    (["ssl.method=simclr", "data.batch_size=5000"], "two full batches"),
    (["ssl.method=simclr", "ssl.crop_scale=[0.5,0.2]"], "crop_scale"),
    (["ssl.method=simclr", "ssl.temperature=0"], "temperature"),
])
def test_pretrain_bad_input_is_one_line_exit_2(tmp_path, capsys, args, expect):
    rc = main(["pretrain", *FAST, f"logging.root={tmp_path}", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and expect in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_probe_of_a_missing_run_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["probe", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1


# ----- masked-LM runs as pretrained encoders -------------------------------------------------------------------
def test_classifier_from_mlm_keeps_the_encoder():
    from lamina.models.bert import classifier_from_mlm

    torch.manual_seed(0)
    mlm = create_model("bert_mlm_mini", vocab_size=50, block_size=16, n_layer=2, n_embd=32, n_head=2, ffn_hidden=64)
    clf = classifier_from_mlm(mlm, 3).eval()
    mlm.eval()
    ids = torch.randint(5, 50, (2, 10))
    torch.testing.assert_close(clf.forward_features(ids), mlm.forward_features(ids))
    assert clf(ids).shape == (2, 3)


@needs_shared("tinyshakespeare/input.txt")
def test_mlm_run_is_a_pretrained_source_for_text_classification(tmp_path, monkeypatch):
    """An MLM run folder fine-tunes a speaker classifier: its tokenizer cuts the speeches, its encoder is kept."""
    from conftest import ROOT

    from lamina import runs
    from lamina.runs.open import open_run

    monkeypatch.chdir(ROOT)
    small = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2",
             "model.ffn_hidden=64", "data.vocab_size=300", "trainer.progress=false",
             "logging.tensorboard=false", "cost.energy=false", f"logging.root={tmp_path}"]
    mlm = runs.train(load_config(ROOT / "configs" / "shakespeare_bert_mlm.yaml",
                                 [*small, "trainer.max_steps=3", "data.max_len=64"])).run_dir
    cfg = load_config(ROOT / "configs" / "shakespeare_speakers_bert.yaml",
                      [*small, f"model.pretrained={mlm}", "trainer.max_steps=3", "trainer.max_epochs=1",
                       "data.max_len=64"])
    res = runs.train(cfg)
    tuned = open_run(res.run_dir)
    encoder = open_run(mlm).model.state_dict()
    assert tuned.facts.meta["vocab_size"] == encoder["wte.weight"].shape[0]  # the MLM run's tokenizer
    assert (res.run_dir / "tokenizer.json").read_text() == (mlm / "tokenizer.json").read_text()
    assert type(tuned.model).__name__ == "BertClassifier" and tuned.model.num_classes == 8
