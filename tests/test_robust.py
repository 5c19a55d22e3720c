"""Attacks and adversarial training: hand-computed FGSM, budgets kept (L-inf, L2, value range), PGD breaks a
trained digits model, APGD at least as strong as PGD, no side effects on the model, PGD-AT through the real
Trainer (uses adversarial inputs; raises robust accuracy), attack_run on a run folder, one-line errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lamina.errors import ConfigError, DataError
from lamina.trust.robust import (Normalized, apgd, apgd_checkpoints, attack_mode, dlr_loss, fgsm, make_attack, pgd,
                                 robust_accuracy)


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors: one thread is faster than two (and much faster on a shared machine); conftest restores it
    torch.set_num_threads(1)


# ----- a trained digits model, shared by the tests of this file ------------------------------------------
def _digits():
    from lamina.data import load_dataset

    b = load_dataset("digits", seed=0)
    return b.train.tensors["x"], b.train.tensors["y"], b.test.tensors["x"], b.test.tensors["y"]


def _fit(model, x, y, steps=100, adv=None, seed=0):
    """Plain AdamW loop on full-batch-ish digits: `adv(model, x, y) -> x_adv` trains on adversarial inputs."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        xb, yb = x[idx], y[idx]
        if adv is not None:
            xb = adv(model, xb, yb)
        model.train()
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    from lamina.models import create_model

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    xtr, ytr, xte, yte = _digits()
    model = _fit(create_model("small_cnn", num_classes=10, in_chans=1), xtr, ytr, steps=80)
    model.zero_grad(set_to_none=True)
    torch.set_num_threads(n)
    return model, xte, yte


def _acc(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# ----- hand-computed and budget checks --------------------------------------------------------------------
def test_fgsm_hand_computed_linear():
    # logits = W x + b; CE gradient wrt x = W^T (softmax - onehot) -> FGSM = clamp(x + eps * sign(that), 0, 1)
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x = torch.tensor([[0.5, 0.5, 0.02, 0.97], [0.2, 0.8, 0.5, 0.5]])
    y = torch.tensor([0, 2])
    with torch.no_grad():
        p = (x @ lin.weight.T + lin.bias).softmax(1)
        g = (p - F.one_hot(y, 3).float()) @ lin.weight  # (B, 4)
    expected = (x + 0.05 * g.sign()).clamp(0, 1)
    out = fgsm(lin, x, y, eps=0.05)
    torch.testing.assert_close(out, expected)
    # two-class case by hand: the target's weight row minus the other's, sign flipped
    lin2 = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin2.weight.copy_(torch.tensor([[1.0, -2.0], [-1.0, 3.0]]))
    xa = torch.tensor([[0.5, 0.5]])
    # y = 0: d CE / dx = (p0 - 1) w0 + p1 w1 = p1 (w1 - w0) = p1 * (-2, 5) -> sign (-1, +1)
    torch.testing.assert_close(fgsm(lin2, xa, torch.tensor([0]), eps=0.1), torch.tensor([[0.4, 0.6]]))


def test_fgsm_within_eps_and_range(trained):
    model, x, y = trained
    out = fgsm(model, x[:200], y[:200], eps=0.1)
    assert (out - x[:200]).abs().max() <= 0.1 + 1e-6
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x[:200]).abs().max() > 0.09  # it moved


def test_pgd_l2_and_linf_budgets(trained):
    model, x, y = trained
    xb, yb = x[:100], y[:100]
    out = pgd(model, xb, yb, eps=0.5, steps=5, norm="l2", generator=torch.Generator().manual_seed(0))
    norms = (out - xb).flatten(1).norm(dim=1)
    assert norms.max() <= 0.5 + 1e-5 and norms.max() > 0.3
    assert out.min() >= 0 and out.max() <= 1
    out = pgd(model, xb, yb, eps=0.05, steps=5, clamp=(0.0, 1.0))
    assert (out - xb).abs().max() <= 0.05 + 1e-6 and out.min() >= 0 and out.max() <= 1


def test_pgd_breaks_trained_model_and_apgd_at_least_as_strong(trained):
    model, x, y = trained
    clean = _acc(model, x, y)
    assert clean > 0.9
    g = torch.Generator().manual_seed(0)
    r_fgsm = robust_accuracy(model, [{"x": x, "y": y}], make_attack("fgsm", eps=0.1))["robust_acc"]
    r_pgd = robust_accuracy(model, [{"x": x, "y": y}], make_attack("pgd", eps=0.1, steps=10, generator=g))
    r_apgd = robust_accuracy(model, [{"x": x, "y": y}], make_attack("apgd", eps=0.1, steps=10, generator=g))
    assert r_pgd["clean_acc"] == pytest.approx(clean)
    assert r_pgd["robust_acc"] < clean - 0.3  # PGD lowers accuracy substantially
    assert r_pgd["robust_acc"] <= r_fgsm + 0.02  # iterating is at least as strong as one step
    assert r_apgd["robust_acc"] <= r_pgd["robust_acc"] + 0.02
    print(f"digits small_cnn eps 0.1: clean {clean:.3f} fgsm {r_fgsm:.3f} pgd-10 {r_pgd['robust_acc']:.3f} "
          f"apgd-10 {r_apgd['robust_acc']:.3f}")


def test_apgd_checkpoints_and_dlr():
    # Croce & Hein: p = 0, .22, .41, .57, .70, .80, .87, .93, .99 of 100 iterations
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, -1.0]])
    # row 0: y=0 is top: -(3 - 1) / (3 - 0) ; row 1: y=0 not top: -(0 - 2) / (2 - 0)
    torch.testing.assert_close(dlr_loss(logits, torch.tensor([0, 0])), torch.tensor([-2 / 3, 1.0]))


def test_attacks_leave_model_untouched(trained):
    model, x, y = trained
    model.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    for atk in ("fgsm", "pgd", "apgd"):
        make_attack(atk, eps=0.1, steps=3)(model, x[:64], y[:64])
    assert model.training  # mode restored
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())  # BN running stats not updated
    model.eval()
    with attack_mode(model, train=True):
        assert model.training and not any(p.requires_grad for p in model.parameters())
    assert not model.training


def test_normalized_wrapper_attacks_in_pixel_space(trained):
    model, x, y = trained
    mean, std = 0.3, 0.4
    # a model trained on normalized inputs = the pixel model composed with the inverse map
    class OnNormalized(nn.Module):
        def forward(self, z):
            return model(z * std + mean)

    net = Normalized(OnNormalized(), mean, std)
    with torch.no_grad():
        torch.testing.assert_close(net(x[:10]), model(x[:10]))
    out = pgd(net, x[:50], y[:50], eps=0.1, steps=3, generator=torch.Generator().manual_seed(0))
    assert (out - x[:50]).abs().max() <= 0.1 + 1e-6 and out.min() >= 0 and out.max() <= 1


def test_errors_are_one_line():
    m = nn.Linear(2, 2)
    x, y = torch.rand(3, 2), torch.tensor([0, 1, 0])
    with pytest.raises(ConfigError, match="eps: expected a number >= 0, got -0.1"):
        fgsm(m, x, y, eps=-0.1)
    with pytest.raises(ConfigError, match="norm: expected one of linf, l2"):
        pgd(m, x, y, eps=0.1, norm="l1")
    with pytest.raises(ConfigError, match="unknown attack 'pdg'.*did you mean 'pgd'"):
        make_attack("pdg")
    with pytest.raises(ConfigError, match="fgsm is an L-inf attack"):
        make_attack("fgsm", norm="l2")
    with pytest.raises(ConfigError, match="steps: expected a positive integer"):
        apgd(m, x, y, eps=0.1, steps=0)
    for e in (ConfigError("a"),):
        assert "\n" not in str(e)


def test_adversarial_config_validation():
    from lamina.config import load_config

    from lamina.config import ConfigDeprecationWarning

    cfg = load_config(None, ["adversarial.method=trades", "adversarial.eps=0.2"])
    assert cfg.adversarial.method == "trades" and cfg.adversarial.beta == 6.0
    for bad, match in [("adversarial.method=fgsm", "adversarial.method"),
                       ("adversarial.eps=-1", "adversarial.eps"),
                       ("adversarial.steps=0", "adversarial.steps"),
                       ("adversarial.norm=l1", "adversarial.norm"),
                       ("adversarial.clean_fraction=1.5", "adversarial.clean_fraction"),
                       ("adversarial.epz=0.1", "adversarial.epz")]:
        with pytest.raises(ConfigError, match=match) as err:
            load_config(None, [bad])
        assert "\n" not in str(err.value)
    # the old key (trainer.adversarial, before objectives had sections of their own) still works, with a warning
    with pytest.warns(ConfigDeprecationWarning, match="trainer.adversarial is deprecated; use the top-level"):
        old = load_config(None, ["trainer.adversarial.method=trades", "trainer.adversarial.eps=0.2"])
    assert old.adversarial == cfg.adversarial and not hasattr(old.trainer, "adversarial")
    with pytest.raises(ConfigError, match="trainer.adversarial: moved to adversarial; give only adversarial"):
        load_config(None, ["trainer.adversarial.method=pgd", "adversarial.method=trades"])


# ----- adversarial training through the Trainer (an objective: a task wrapper) ------------------------------
def _adversarial(task, method: str, **adv):
    from lamina.config.schema import AdversarialConfig
    from lamina.runs.objectives.adversarial import AdversarialTask

    return task if method == "none" else AdversarialTask(task, AdversarialConfig(method=method, eps=0.1, steps=2,
                                                                                 **adv))


def _trainer_fit(method: str, steps: int, x, y, seed=0, **adv):
    from lamina.data import TensorData, make_loader
    from lamina.engine import Trainer
    from lamina.models import create_model
    from lamina.tasks import build_task

    torch.manual_seed(seed)
    model = create_model("small_cnn", num_classes=10, in_chans=1)
    trainer = Trainer(max_epochs=100, max_steps=steps, progress=False, threads=1)
    loader = make_loader(TensorData(x=x, y=y), 128, shuffle=True, seed=seed)
    task = _adversarial(build_task("classification", num_classes=10), method, **adv)
    trainer.fit(model, task, loader, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    return model.eval(), trainer


def test_train_step_uses_adversarial_inputs():
    from lamina.engine import Trainer
    from lamina.models import create_model
    from lamina.tasks import build_task

    torch.manual_seed(0)
    xtr, ytr, _, _ = _digits()
    x, y = xtr[:32], ytr[:32]
    seen = []
    for method in ("none", "pgd", "trades"):
        model = create_model("small_cnn", num_classes=10, in_chans=1)
        trainer = Trainer()
        trainer.setup(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                      _adversarial(build_task("classification", num_classes=10), method))
        got = []
        h = model.register_forward_pre_hook(lambda m, a: got.append(a[0].detach().clone()) if m.training else None)
        model.train()
        loss, out = trainer.train_step({"x": x, "y": y})
        h.remove()
        assert len(got) == 1 and torch.isfinite(loss) and out.shape == (64 if method == "trades" else 32, 10)
        seen.append((method, got[0]))
        assert all(p.grad is None for p in model.parameters())  # the attack accumulated nothing
        assert model.training
    (_, plain), (_, adv), (_, trades) = seen
    torch.testing.assert_close(plain, x)
    d = adv - x
    assert d.abs().max() > 0.05 and d.abs().max() <= 0.1 + 1e-6  # PGD inputs, inside the budget
    assert trades.shape[0] == 64 and torch.equal(trades[:32], x)  # TRADES: clean and adversarial in one forward
    assert (trades[32:] - x).abs().max() <= 0.1 + 1e-6 and (trades[32:] - x).abs().max() > 0.01


def test_pgd_training_raises_robust_accuracy():
    xtr, ytr, xte, yte = _digits()
    clean_model, _ = _trainer_fit("none", 50, xtr, ytr)
    adv_model, trainer = _trainer_fit("pgd", 50, xtr, ytr)
    assert trainer.global_step == 50
    g = torch.Generator().manual_seed(0)
    atk = make_attack("pgd", eps=0.1, steps=10, generator=g)
    r_clean = robust_accuracy(clean_model, [{"x": xte, "y": yte}], atk)
    r_adv = robust_accuracy(adv_model, [{"x": xte, "y": yte}], atk)
    print("digits PGD-10 eps 0.1: clean-trained", r_clean, "PGD-AT", r_adv)
    assert r_adv["robust_acc"] > r_clean["robust_acc"] + 0.2
    assert r_adv["clean_acc"] > 0.8


def test_attack_run_and_adversarial_run(tmp_path):
    from lamina.config import load_config
    from lamina.runs import train
    from lamina.trust.robust import attack_run

    cfg = load_config(None, ["logging.tensorboard=false", "logging.plots=false", "trainer.progress=false",
                             "trainer.max_epochs=1", f"logging.root={tmp_path}", "adversarial.method=pgd",
                             "adversarial.steps=2",
                             "data.augment=[{name: normalize, mean: 0.3, std: 0.4}]"])
    res = train(cfg)
    assert res.history[-1]["train/adv_eps"] == 0.1
    out = attack_run(res.run_dir, attack="pgd", eps=0.1, steps=3, n=100)
    saved = json.loads((res.run_dir / "attack.json").read_text())
    assert saved == out and out["n"] == 100 and 0 <= out["robust_acc"] <= out["clean_acc"] <= 1
    assert set(out) >= {"clean_acc", "robust_acc", "eps", "steps", "norm", "attack", "n", "seconds"}
    assert out["adversarial_training"] == "pgd"
    with pytest.raises(ConfigError, match="eps"):
        attack_run(res.run_dir, eps=-1)
    with pytest.raises(ConfigError, match="unknown attack"):
        attack_run(res.run_dir, attack="cw")
