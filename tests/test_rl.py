"""Reinforcement learning: GAE, PPO's clipped loss and DQN's (double-)Q targets against hand computations, the
replay buffer, truncation bootstrapping, short PPO and DQN runs on CartPole with their run folders, `lamina rl
eval`, and one-line errors for unknown environments and unsupported spaces."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium", reason="reinforcement learning needs gymnasium (pip install \"lamina[rl]\")")

from conftest import ROOT  # noqa: E402
from lamina.cli.main import main  # noqa: E402
from lamina.errors import ConfigError  # noqa: E402
from lamina.runs.objectives.rl import ReplayBuffer, RewardScaler, dqn_targets, gae, ppo_loss  # noqa: E402

QUICK = ["trainer.progress=false", "--no-progress"]


def test_gae_matches_the_recursion_by_hand():
    g = torch.Generator().manual_seed(0)
    T, N, gamma, lam = 6, 3, 0.9, 0.8
    r, v = torch.randn(T, N, generator=g), torch.randn(T, N, generator=g)
    d = torch.zeros(T, N)
    d[2, 0] = d[5, 1] = d[0, 2] = 1.0
    last = torch.randn(N, generator=g)
    adv, ret = gae(r, v, d, last, gamma, lam)
    for n in range(N):
        a_next = 0.0
        for t in reversed(range(T)):
            nv = float(last[n]) if t == T - 1 else float(v[t + 1, n])
            nonterm = 1.0 - float(d[t, n])
            delta = float(r[t, n]) + gamma * nv * nonterm - float(v[t, n])
            a_next = delta + gamma * lam * nonterm * a_next
            assert adv[t, n].item() == pytest.approx(a_next, abs=1e-5)
    assert torch.allclose(ret, adv + v)
    # lambda 1, no dones: advantages + values are the discounted returns bootstrapped from last
    adv1, ret1 = gae(r, v, torch.zeros(T, N), last, gamma, 1.0)
    want = last.clone()
    for t in reversed(range(T)):
        want = r[t] + gamma * want
        assert torch.allclose(ret1[t], want, atol=1e-5)


def test_ppo_loss_is_the_clipped_surrogate():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 3, generator=g, requires_grad=True)
    actions = torch.randint(0, 3, (8,), generator=g)
    old = torch.distributions.Categorical(logits=logits.detach() + 0.3 * torch.randn(8, 3, generator=g)).log_prob(actions)
    adv, ret = torch.randn(8, generator=g), torch.randn(8, generator=g)
    values = torch.randn(8, generator=g)
    loss, st = ppo_loss(logits, values, actions, old, adv, ret, 0.2, 0.5, 0.01)
    dist = torch.distributions.Categorical(logits=logits)
    ratio = (dist.log_prob(actions) - old).exp()
    a = (adv - adv.mean()) / (adv.std() + 1e-8)
    ratio = ratio.detach()
    terms = [min(float(ratio[i] * a[i]), float(ratio[i].clamp(0.8, 1.2) * a[i])) for i in range(8)]
    want = -np.mean(terms) + 0.5 * float(((values - ret) ** 2).mean()) - 0.01 * float(dist.entropy().mean().detach())
    assert float(loss) == pytest.approx(want, abs=1e-5)
    assert float(st["clip_fraction"]) == pytest.approx(float(((ratio - 1).abs() > 0.2).float().mean()))
    # both ratios are 1.67 > 1.2; advantages normalise to -0.71 and +0.71: the positive one is past the clip in
    # its direction and gets no policy gradient, the negative one still does
    lg = torch.zeros(2, 2, requires_grad=True)
    act = torch.tensor([0, 0])
    old_lp = torch.log(torch.tensor([0.3, 0.3]))  # new prob 0.5
    l2, _ = ppo_loss(lg, torch.zeros(2), act, old_lp, torch.tensor([1.0, 2.0]), torch.zeros(2), 0.2, 0.0, 0.0)
    l2.backward()
    assert torch.all(lg.grad[1] == 0) and torch.all(lg.grad[0] != 0)


def test_dqn_targets_plain_and_double():
    qt = torch.tensor([[1.0, 5.0], [2.0, 0.0]])
    qo = torch.tensor([[3.0, 1.0], [0.0, 4.0]])
    r, term = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(dqn_targets(qt, None, r, term, 0.5), torch.tensor([1 + 0.5 * 5, 1.0]))
    # double-Q: the online net picks the action (0 for row 0), the target net values it (1.0)
    assert torch.allclose(dqn_targets(qt, qo, r, term, 0.5), torch.tensor([1 + 0.5 * 1.0, 1.0]))


def test_replay_buffer_wraps_and_samples():
    b = ReplayBuffer(4, 2, seed=0)
    for i in range(6):
        b.add([i, i], i % 2, float(i), [i + 1, i + 1], i == 5)
    assert b.size == 4 and b.pos == 2
    assert sorted(b.rewards.tolist()) == [2.0, 3.0, 4.0, 5.0]  # the two oldest were overwritten
    s = b.sample(32)
    assert s["obs"].shape == (32, 2) and set(s["rewards"].tolist()) <= {2.0, 3.0, 4.0, 5.0}
    assert torch.all(s["next_obs"] == s["obs"] + 1)


def test_truncated_episodes_are_bootstrapped_terminated_ones_are_not():
    from lamina.runs.rl import bootstrap_truncated

    critic = torch.nn.Linear(2, 1)
    with torch.no_grad():
        critic.weight.fill_(1.0)
        critic.bias.zero_()
    rew = np.array([1.0, 1.0, 1.0], dtype=np.float32)
    term, trunc = np.array([True, False, False]), np.array([True, True, False])
    final = [np.array([9.0, 9.0]), np.array([2.0, 3.0]), None]
    out = bootstrap_truncated(rew, term, trunc, final, critic, 0.5)
    assert out.tolist() == [1.0, 1.0 + 0.5 * 5.0, 1.0]  # env 0 terminated (and truncated): no bootstrap


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    from lamina.config import load_config
    from lamina.runs.rl import train_rl

    root = tmp_path_factory.mktemp("rl")
    cfg = load_config(ROOT / "configs" / "cartpole_ppo.yaml",
                      ["rl.total_steps=6144", "rl.eval_every=3072", "rl.eval_episodes=5", f"logging.root={root}"])
    events = []
    return train_rl(cfg, events.append), events


def test_short_ppo_run_learns_and_writes_its_folder(ppo_run):
    from pathlib import Path

    s, events = ppo_run
    d = Path(s["run_dir"])
    for f in ("config.yaml", "rl.json", "episodes.csv", "summary.json", "curves.png", "checkpoints/best.safetensors",
              "checkpoints/last.safetensors", "checkpoints/critic.safetensors"):
        assert (d / f).is_file(), f
    assert s["steps"] == 6144 and len(s["evals"]) == 2 and s["episodes"] > 50
    # an untrained greedy policy repeats one action and falls in ~10 steps; 6k steps of PPO already balance longer
    assert s["best_eval"] > 60, s["evals"]
    assert {e["event"] for e in events} >= {"start", "episode", "eval", "done"}
    rows = (d / "episodes.csv").read_text().splitlines()
    assert rows[0] == "step,return,length" and len(rows) == s["episodes"] + 1


def test_rl_eval_cli_replays_the_best_policy(ppo_run, tmp_path, capsys):
    s, _ = ppo_run
    assert main(["rl", "eval", s["run_dir"], "--episodes", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["episodes"] == 3 and len(r["returns"]) == 3 and r["mean"] > 30
    pytest.importorskip("pygame", reason="rendering CartPole needs pygame")
    png = tmp_path / "strip.png"
    assert main(["rl", "eval", s["run_dir"], "--episodes", "1", "--frames", str(png)]) == 0
    assert png.is_file() and png.stat().st_size > 1000
    from PIL import Image

    gif = tmp_path / "episode.gif"
    assert main(["rl", "eval", s["run_dir"], "--episodes", "1", "--video", str(gif), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    with Image.open(gif) as im:  # every 2nd step of the episode, 40 ms a frame (real time at 50 Hz)
        assert im.n_frames > 10 and im.info["duration"] == 40 and max(im.size) <= 320
    assert r["video_frames"] == -(-int(r["returns"][0]) // 2)  # CartPole: one reward per step
    assert main(["rl", "eval", s["run_dir"], "--video", str(tmp_path / "x.mp4")]) == 2
    assert "--video: writes an animated GIF" in capsys.readouterr().err


def test_short_dqn_run(tmp_path):
    from lamina.config import load_config
    from lamina.runs.rl import train_rl

    cfg = load_config(ROOT / "configs" / "cartpole_dqn.yaml",
                      ["rl.total_steps=1500", "rl.learning_starts=500", "rl.train_freq=100", "rl.gradient_steps=10",
                       "rl.eval_every=1500", "rl.eval_episodes=2", "model.width=32", f"logging.root={tmp_path}"])
    s = train_rl(cfg)
    assert s["steps"] == 1500 and len(s["evals"]) == 1 and s["episodes"] > 10


@pytest.mark.parametrize("args,msg", [
    (["rl.env=NoSuchEnv-v9"], "is not a Gymnasium environment here"),
    (["rl.env=Pendulum-v1"], "Discrete action space"),
    (["rl.total_steps=0"], "rl.total_steps"),
    (["rl.algo=sac"], "rl.algo"),
    (["model.name=cnn_medium"], "mlp networks"),
])
def test_rl_bad_input_is_one_line_exit_2(args, msg, tmp_path, capsys):
    rc = main(["rl", "train", str(ROOT / "configs" / "cartpole_ppo.yaml"), *args, f"logging.root={tmp_path}",
               "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and len(err.splitlines()) == 1, err
    assert not any(tmp_path.iterdir())  # nothing written


def test_rl_eval_of_a_folder_that_is_not_an_rl_run(tmp_path, capsys):
    assert main(["rl", "eval", str(tmp_path)]) == 2
    assert "not a reinforcement-learning run folder" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        from lamina.runs.rl import evaluate_rl

        evaluate_rl(tmp_path, episodes=0)


def test_rl_seeds_give_a_band_over_seeds(tmp_path, capsys):
    rc = main(["rl", "train", str(ROOT / "configs" / "cartpole_ppo.yaml"), "rl.total_steps=2048", "rl.eval_every=1024",
               "rl.eval_episodes=2", f"logging.root={tmp_path}", "--seeds", "0,1", "--json", "--no-progress"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    d = tmp_path / "cartpole-ppo-seeds"
    assert (d / "seeds.json").is_file() and (d / "returns.png").is_file()
    assert res["seeds"] == [0, 1] and len(res["run_dirs"]) == 2 and res["steps"] == [1024, 2048]
    finals = res["final"]["values"]
    assert res["mean"][-1] == pytest.approx(sum(finals) / 2)
    assert res["ci95_half_width"][-1] == pytest.approx(12.706 * abs(finals[0] - finals[1]) / 2, rel=1e-3)


def test_reward_scaler_divides_by_the_std_of_discounted_returns():
    rng = np.random.default_rng(0)
    sc = RewardScaler(3, gamma=0.9)
    ret, seen = np.zeros(3), []
    for t in range(200):
        r = rng.normal(-1.0, 0.5, 3)
        done = rng.random(3) < 0.05
        out = sc(r, done)
        ret = ret * 0.9 + r  # the discounted return by hand, reset after an episode ends
        seen.append(ret.copy())
        ret[done] = 0.0
        # the running statistics start from a prior of weight 1e-4 (mean 0, variance 1): 0.1% at the first step
        want = np.clip(r / np.sqrt(np.var(np.concatenate(seen)) + 1e-8), -10, 10)
        assert np.allclose(out, want, rtol=2e-3), t
    assert abs(sc.var - np.var(np.concatenate(seen))) < 1e-5
