"""Reinforcement learning on Gymnasium: `train_rl(cfg)` runs PPO or DQN (the `rl` config section) and writes a run
folder; `evaluate_rl(run)` replays its policy greedily, optionally as a strip of rendered frames.

The networks are zoo MLPs (`create_model("mlp", ...)` with the model section's width / depth / activation):
PPO has a separate actor (logits over actions) and critic (one value), as Stable-Baselines3's MlpPolicy; DQN has
an online and a target Q network. The losses are lamina/runs/objectives/rl.py's.

* PPO collects `n_steps` from each of `num_envs` environments (gymnasium.vector.SyncVectorEnv, same-step
  autoreset: a finished episode's final observation is in the step's info, so a time-limit truncation is
  bootstrapped with its value), then makes `epochs` passes in `minibatches` over the rollout.
* DQN acts epsilon-greedily in one environment (epsilon decays linearly over `exploration_fraction` of the
  steps), stores transitions (terminal only on true termination), and every `train_freq` steps makes
  `gradient_steps` updates of `batch_size`; the target network copies the online one every `target_update`
  environment steps.
Every `eval_every` steps the greedy policy plays `eval_episodes` episodes on a separately seeded environment.

Run folder: config.yaml, rl.json (environment, spaces, network options), checkpoints/last.safetensors and
checkpoints/best.safetensors (the best evaluation; written atomically, so a crash leaves the previous one),
checkpoints/critic.safetensors (PPO's final critic),
episodes.csv (step, return, length of every training episode), summary.json (evaluations, steps/s), curves.png.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lamina.config import RunConfig, to_yaml
from lamina.errors import ConfigError, DataError, MissingDependencyError
from lamina.io import atomic_write_text, load_state, save_state
from lamina.runs.folder import RunFolder
from lamina.runs.objectives.rl import ReplayBuffer, RewardScaler, dqn_targets, gae, ppo_loss

DEFAULTS = {"ppo": {"gamma": 0.98, "lr": 1e-3, "max_grad_norm": 0.5},
            "dqn": {"gamma": 0.99, "lr": 2.3e-3, "max_grad_norm": 10.0}}
NET_DEFAULTS = {"ppo": {"width": 64, "depth": 2, "activation": "tanh"},
                "dqn": {"width": 256, "depth": 2, "activation": "relu"}}
MAX_TOTAL_STEPS = 50_000_000  # what one config may ask for
MAX_EVAL_EPISODES = 1000
MAX_FRAMES = 600  # one recording: 24 s at 25 frames/s, ~100 MB of 320 px RGB frames at most


def _gym():
    try:
        import gymnasium
    except ImportError:
        raise MissingDependencyError("gymnasium is not installed; reinforcement learning needs it: pip install "
                                     "\"lamina[rl]\"") from None
    return gymnasium


def make_env(env_id: str, max_episode_steps: int | None = None, render_mode: str | None = None):
    """gymnasium.make with one-line errors: an unknown id, a missing extra (Box2D), unsupported spaces."""
    gym = _gym()
    if render_mode:  # pygame greets on import, on stdout: it would corrupt `--json` output
        import os

        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    kw = {"render_mode": render_mode}
    if max_episode_steps is not None:
        kw["max_episode_steps"] = int(max_episode_steps)
    try:
        env = gym.make(env_id, **kw)
    except gym.error.DependencyNotInstalled as e:
        raise MissingDependencyError(f"rl.env: {env_id} needs an extra package ({str(e).splitlines()[0]})") from None
    except (gym.error.Error, ValueError, TypeError) as e:
        known = ", ".join(k for k in ("CartPole-v1", "Acrobot-v1", "MountainCar-v0", "LunarLander-v3")
                          if k in gym.registry)
        raise ConfigError(f"rl.env: {env_id!r} is not a Gymnasium environment here ({str(e).splitlines()[0]}); "
                          f"e.g. {known}") from None
    obs, act = env.observation_space, env.action_space
    if not (isinstance(obs, gym.spaces.Box) and len(obs.shape) == 1 and isinstance(act, gym.spaces.Discrete)):
        env.close()
        raise ConfigError(f"rl.env: {env_id} has observations {obs} and actions {act}; lamina's PPO and DQN take a "
                          "flat Box observation and a Discrete action space (CartPole-v1, Acrobot-v1, LunarLander-v3)")
    return env


def _net(cfg: RunConfig, algo: str, in_features: int, out: int) -> torch.nn.Module:
    from lamina.models import create_model

    return create_model("mlp", in_features=in_features, num_classes=out, **net_options(cfg, algo))


def net_options(cfg: RunConfig, algo: str) -> dict:
    return {**NET_DEFAULTS[algo], "dropout": 0.0, **cfg.model.options}


def settings(cfg: RunConfig) -> dict:
    r = cfg.rl
    s = {k: (getattr(r, k) if getattr(r, k) is not None else v) for k, v in DEFAULTS[r.algo].items()}
    if cfg.model.name not in ("mlp", "small_cnn"):  # small_cnn: the model section's default, i.e. nothing chosen
        raise ConfigError(f"model.name: reinforcement learning uses mlp networks for flat observations, got "
                          f"{cfg.model.name}")
    if r.total_steps > MAX_TOTAL_STEPS:
        raise ConfigError(f"rl.total_steps: at most {MAX_TOTAL_STEPS:,}, got {r.total_steps:,}")
    if r.eval_episodes > MAX_EVAL_EPISODES:
        raise ConfigError(f"rl.eval_episodes: at most {MAX_EVAL_EPISODES}, got {r.eval_episodes}")
    if r.algo == "ppo" and r.n_steps * r.num_envs < r.minibatches:
        raise ConfigError(f"rl.minibatches: {r.minibatches} minibatches of a {r.n_steps * r.num_envs}-step rollout")
    if r.algo == "dqn" and r.batch_size > r.buffer_size:
        raise ConfigError(f"rl.batch_size: {r.batch_size} is more than the buffer's {r.buffer_size} transitions")
    return s


@torch.no_grad()
def greedy_episodes(policy: torch.nn.Module, env_id: str, episodes: int, seed: int,
                    max_episode_steps: int | None = None, frames_every: int = 0) -> dict:
    """Returns of `episodes` greedy episodes on a fresh environment seeded `seed`; with frames_every > 0, every
    frames_every-th rendered frame of the first episode (at most MAX_FRAMES, each at most 320 px wide)."""
    env = make_env(env_id, max_episode_steps, render_mode="rgb_array" if frames_every else None)
    policy.eval()
    returns, lengths, frames = [], [], []
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            total, n, done = 0.0, 0, False
            while not done:
                if frames_every and ep == 0 and n % frames_every == 0 and len(frames) < MAX_FRAMES:
                    frames.append(_shrink(env.render()))
                a = int(policy(torch.as_tensor(obs, dtype=torch.float32)[None]).argmax(-1))
                obs, r, term, trunc, _ = env.step(a)
                total, n, done = total + float(r), n + 1, term or trunc
            returns.append(total)
            lengths.append(n)
    finally:
        env.close()
    out = {"mean": float(np.mean(returns)), "std": float(np.std(returns)), "returns": returns, "lengths": lengths}
    if frames_every:
        out["frames"] = frames
    return out


@torch.no_grad()
def bootstrap_truncated(rew: np.ndarray, term: np.ndarray, trunc: np.ndarray, final_obs, critic, gamma: float
                        ) -> np.ndarray:
    """Rewards with gamma * V(final observation) added where an episode was cut by a time limit (truncated, not
    terminated): the episode would have gone on, so its value does not drop to zero there."""
    cut = trunc & ~term
    if not cut.any():
        return rew
    final = torch.as_tensor(np.stack([final_obs[i] for i in np.nonzero(cut)[0]]), dtype=torch.float32)
    out = rew.copy()
    out[cut] += gamma * critic(final).squeeze(-1).numpy()
    return out


def _shrink(frame: np.ndarray, width: int = 320) -> np.ndarray:
    """A rendered frame no wider than `width` (every other pixel until it fits): bounds a recording's memory."""
    step = max(1, -(-frame.shape[1] // width))
    return np.ascontiguousarray(frame[::step, ::step])


class _Recorder:
    """Training-episode bookkeeping shared by both algorithms: returns per env, rows for episodes.csv."""

    def __init__(self, n: int, emit: Callable[[dict], None]):
        self.ret, self.len = np.zeros(n), np.zeros(n, dtype=int)
        self.rows: list[tuple[int, float, int]] = []
        self.emit = emit

    def step(self, rewards, dones, global_step: int) -> None:
        self.ret += rewards
        self.len += 1
        for i in np.nonzero(dones)[0]:
            self.rows.append((global_step, float(self.ret[i]), int(self.len[i])))
            self.emit({"event": "episode", "step": global_step, "return": float(self.ret[i])})
            self.ret[i], self.len[i] = 0.0, 0


def train_rl(cfg: RunConfig, on_event: Callable[[dict], None] | None = None, run_dir: str | Path | None = None
             ) -> dict:
    emit = on_event or (lambda ev: None)
    r = cfg.rl
    s = settings(cfg)
    torch.manual_seed(cfg.seed)
    probe = make_env(r.env, r.max_episode_steps)
    obs_dim, n_actions = int(probe.observation_space.shape[0]), int(probe.action_space.n)
    probe.close()
    folder = RunFolder(run_dir) if run_dir else RunFolder.new(cfg.logging.root, cfg.name, r.env, r.algo)
    folder.path.mkdir(parents=True, exist_ok=True)
    (folder.checkpoints).mkdir(exist_ok=True)
    folder.write_text("config.yaml", to_yaml(cfg))
    meta = {"env": r.env, "algo": r.algo, "obs_dim": obs_dim, "n_actions": n_actions,
            "net": net_options(cfg, r.algo), "max_episode_steps": r.max_episode_steps, **s}
    folder.write_text("rl.json", json.dumps(meta, indent=2))
    emit({"event": "start", "env": r.env, "algo": r.algo, "obs_dim": obs_dim, "n_actions": n_actions,
          "total_steps": r.total_steps, "run_dir": str(folder.path)})
    evals: list[dict] = []
    best = {"mean": -math.inf}

    def evaluate(policy, step: int) -> None:
        e = greedy_episodes(policy, r.env, r.eval_episodes, cfg.seed + 10_000, r.max_episode_steps)
        policy.train()
        evals.append({"step": step, "mean": e["mean"], "std": e["std"]})
        save_state(folder.checkpoints / "last.safetensors", policy, {"step": str(step)})
        if e["mean"] > best["mean"]:
            best.update(mean=e["mean"], step=step)
            save_state(folder.checkpoints / "best.safetensors", policy, {"step": str(step)})
        emit({"event": "eval", "step": step, "mean": e["mean"], "std": e["std"]})

    t0 = time.perf_counter()
    loop = _train_ppo if r.algo == "ppo" else _train_dqn
    # Networks this small lose more to intra-op thread synchronisation than they gain: PPO on CartPole ran at
    # 4,518 steps/s with 1 thread against 3,381 with 2 on this 2-core machine (DQN: 929 vs 923).
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.trainer.threads or 1)
    try:
        rec, steps, eval_s = loop(cfg, s, obs_dim, n_actions, evaluate, emit, folder)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - t0
    with io.StringIO() as buf:
        w = csv.writer(buf)
        w.writerow(["step", "return", "length"])
        w.writerows(rec.rows)
        atomic_write_text(folder.path / "episodes.csv", buf.getvalue())
    last100 = [x[1] for x in rec.rows[-100:]]
    summary = {"run_dir": str(folder.path), "env": r.env, "algo": r.algo, "seed": cfg.seed, "steps": steps,
               "episodes": len(rec.rows), "train_return_last100": float(np.mean(last100)) if last100 else None,
               "evals": evals, "best_eval": best.get("mean"), "best_step": best.get("step"),
               "final_eval": evals[-1]["mean"] if evals else None, "wall_s": wall,
               "steps_per_s": steps / max(wall - eval_s, 1e-9), "eval_s": eval_s}
    folder.write_text("summary.json", json.dumps(summary, indent=2))
    from lamina.plots import plot_rl_returns

    plot_rl_returns(rec.rows, evals, folder.curves, title=f"{r.algo.upper()} on {r.env}")
    emit({"event": "done", **summary})
    return summary


def _evaluator(r, evaluate, policy):
    """Calls evaluate at every multiple of eval_every the step counter passes; returns seconds spent."""
    state = {"next": r.eval_every, "seconds": 0.0}

    def maybe(step: int, final: bool = False) -> None:
        if step >= state["next"] or final:
            t = time.perf_counter()
            evaluate(policy, step)
            state["seconds"] += time.perf_counter() - t
            while state["next"] <= step:
                state["next"] += r.eval_every

    return maybe, state


def _train_ppo(cfg, s, obs_dim, n_actions, evaluate, emit, folder):
    gym = _gym()
    r = cfg.rl
    actor, critic = _net(cfg, "ppo", obs_dim, n_actions), _net(cfg, "ppo", obs_dim, 1)
    params = [*actor.parameters(), *critic.parameters()]
    opt = torch.optim.Adam(params, lr=s["lr"], eps=1e-5)
    envs = gym.vector.SyncVectorEnv([lambda: make_env(r.env, r.max_episode_steps) for _ in range(r.num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    g = torch.Generator().manual_seed(cfg.seed)
    rec = _Recorder(r.num_envs, emit)
    maybe_eval, ev = _evaluator(r, evaluate, actor)
    N, T = r.num_envs, r.n_steps
    updates = max(1, r.total_steps // (N * T))
    obs_np, _ = envs.reset(seed=cfg.seed)
    scaler = RewardScaler(N, s["gamma"]) if r.normalize_reward else None
    step = 0
    try:
        for u in range(updates):
            for grp in opt.param_groups:
                grp["lr"] = s["lr"] * (1.0 - u / updates) if r.anneal_lr else s["lr"]
            buf = {k: [] for k in ("obs", "actions", "logp", "values", "rewards", "dones")}
            for _ in range(T):
                obs = torch.as_tensor(obs_np, dtype=torch.float32)
                with torch.no_grad():
                    logits, value = actor(obs), critic(obs).squeeze(-1)
                    action = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(-1)
                    logp = torch.distributions.Categorical(logits=logits).log_prob(action)
                obs_np, rew, term, trunc, info = envs.step(action.numpy())
                rew = rew.astype(np.float32)
                rec.step(rew, term | trunc, step + N)
                if scaler is not None:  # before bootstrapping: the critic learns returns on the scaled scale
                    rew = scaler(rew, term | trunc)
                rew = bootstrap_truncated(rew, term, trunc, info.get("final_obs"), critic, s["gamma"])
                for k, v in (("obs", obs), ("actions", action), ("logp", logp), ("values", value),
                             ("rewards", torch.as_tensor(rew)),
                             ("dones", torch.as_tensor(term | trunc, dtype=torch.float32))):
                    buf[k].append(v)
                step += N
            with torch.no_grad():
                last = critic(torch.as_tensor(obs_np, dtype=torch.float32)).squeeze(-1)
            roll = {k: torch.stack(v) for k, v in buf.items()}  # (T, N, ...)
            adv, ret = gae(roll["rewards"], roll["values"], roll["dones"], last, s["gamma"], r.gae_lambda)
            flat = {"obs": roll["obs"].reshape(T * N, -1), "actions": roll["actions"].reshape(-1),
                    "logp": roll["logp"].reshape(-1), "adv": adv.reshape(-1), "ret": ret.reshape(-1)}
            size = T * N // r.minibatches
            for _ in range(r.epochs):
                perm = torch.randperm(T * N, generator=g)
                for m in range(r.minibatches):
                    idx = perm[m * size:(m + 1) * size]
                    loss, _ = ppo_loss(actor(flat["obs"][idx]), critic(flat["obs"][idx]).squeeze(-1),
                                       flat["actions"][idx], flat["logp"][idx], flat["adv"][idx], flat["ret"][idx],
                                       r.clip, r.vf_coef, r.ent_coef)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, s["max_grad_norm"])
                    opt.step()
            maybe_eval(step, final=u == updates - 1)
    finally:
        envs.close()
    # the final critic beside the policies, for inspection (evaluation and acting need only the actor)
    save_state(folder.checkpoints / "critic.safetensors", critic)
    return rec, step, ev["seconds"]


def _train_dqn(cfg, s, obs_dim, n_actions, evaluate, emit, folder):
    r = cfg.rl
    q = _net(cfg, "dqn", obs_dim, n_actions)
    target = copy.deepcopy(q).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(q.parameters(), lr=s["lr"])
    env = make_env(r.env, r.max_episode_steps)
    buffer = ReplayBuffer(min(r.buffer_size, r.total_steps), obs_dim, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    rec = _Recorder(1, emit)
    maybe_eval, ev = _evaluator(r, evaluate, q)
    decay = max(1, int(r.exploration_fraction * r.total_steps))
    obs, _ = env.reset(seed=cfg.seed)
    try:
        for step in range(1, r.total_steps + 1):
            eps = max(r.exploration_final, 1.0 - (1.0 - r.exploration_final) * (step - 1) / decay)
            if step <= r.learning_starts or float(torch.rand(1, generator=g)) < eps:
                a = int(torch.randint(n_actions, (1,), generator=g))
            else:
                with torch.no_grad():
                    a = int(q(torch.as_tensor(obs, dtype=torch.float32)[None]).argmax(-1))
            nxt, rew, term, trunc, _ = env.step(a)
            buffer.add(obs, a, rew, nxt, term)  # truncation is not terminal: its target bootstraps
            rec.step(np.array([rew]), np.array([term or trunc]), step)
            obs = env.reset()[0] if term or trunc else nxt
            if step > r.learning_starts and step % r.train_freq == 0:
                for _ in range(r.gradient_steps):
                    b = buffer.sample(r.batch_size)
                    with torch.no_grad():
                        y = dqn_targets(target(b["next_obs"]), q(b["next_obs"]) if r.double_q else None,
                                        b["rewards"], b["terminal"], s["gamma"])
                    q_sa = q(b["obs"]).gather(1, b["actions"][:, None]).squeeze(1)
                    loss = torch.nn.functional.smooth_l1_loss(q_sa, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(q.parameters(), s["max_grad_norm"])
                    opt.step()
            if step % r.target_update == 0:
                target.load_state_dict(q.state_dict())
            maybe_eval(step, final=step == r.total_steps)
    finally:
        env.close()
    return rec, r.total_steps, ev["seconds"]


def train_rl_seeds(cfg: RunConfig, seeds: list[int], on_event: Callable[[dict], None] | None = None) -> dict:
    """The same config once per seed, in <logging.root>/<name>-seeds/seed<s>; seeds.json there holds every run's
    evaluations and the mean with a 95% t interval over seeds at each evaluation step, returns.png draws them."""
    from scipy import stats

    from lamina.config import to_dict, validate
    from lamina.plots import plot_rl_seeds

    name = cfg.name or f"{cfg.rl.env}-{cfg.rl.algo}"
    out = RunFolder.new(cfg.logging.root, f"{name}-seeds", cfg.rl.env, cfg.rl.algo).path
    runs = []
    for seed in seeds:
        raw = to_dict(cfg)
        raw.update(seed=seed, name=f"seed{seed}")
        raw["logging"]["root"] = str(out)
        runs.append(train_rl(validate(raw), on_event))
    n = min(len(r["evals"]) for r in runs)
    steps = [runs[0]["evals"][i]["step"] for i in range(n)]
    m = np.array([[e["mean"] for e in r["evals"][:n]] for r in runs])
    mean = m.mean(0)
    half = (stats.t.ppf(0.975, len(runs) - 1) * m.std(0, ddof=1) / np.sqrt(len(runs))) if len(runs) > 1 else 0 * mean
    finals = [r["final_eval"] for r in runs]
    result = {"env": cfg.rl.env, "algo": cfg.rl.algo, "seeds": list(seeds), "run_dirs": [r["run_dir"] for r in runs],
              "steps": steps, "mean": mean.tolist(), "ci95_half_width": np.asarray(half).tolist(),
              "final": {"mean": float(np.mean(finals)), "std": float(np.std(finals, ddof=1)) if len(finals) > 1
                        else 0.0, "values": finals},
              "steps_per_s": [r["steps_per_s"] for r in runs]}
    atomic_write_text(out / "seeds.json", json.dumps(result, indent=2))
    plot_rl_seeds(steps, m, out / "returns.png", title=f"{cfg.rl.algo.upper()} on {cfg.rl.env}, {len(runs)} seeds")
    result["folder"] = str(out)
    return result


def open_policy(run_dir: str | Path, which: str = "best") -> tuple[torch.nn.Module, dict]:
    """(greedy policy network with the checkpoint's weights, rl.json) of an RL run folder."""
    from lamina.models import create_model

    p = Path(run_dir).expanduser()
    meta_path = p / "rl.json"
    if not meta_path.is_file():
        raise DataError(f"{p}: not a reinforcement-learning run folder (no rl.json); train one with `lamina rl train`")
    try:
        meta = json.loads(meta_path.read_text())
        net = create_model("mlp", in_features=int(meta["obs_dim"]), num_classes=int(meta["n_actions"]),
                           **meta["net"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{meta_path}: unreadable ({type(e).__name__}: {e})") from None
    ckpt = p / "checkpoints" / f"{which}.safetensors"
    if not ckpt.is_file():
        raise DataError(f"{ckpt}: checkpoint not found (which: best or last)")
    try:
        net.load_state_dict(load_state(ckpt))
    except (RuntimeError, OSError) as e:
        raise DataError(f"{ckpt}: does not fit the run's network ({str(e).splitlines()[0][:120]})") from None
    return net.eval(), meta


def evaluate_rl(run_dir: str | Path, episodes: int = 10, seed: int = 20_000, which: str = "best",
                frames: str | Path | None = None, frames_every: int = 10, video: str | Path | None = None) -> dict:
    """Greedy returns of a trained policy; `frames`: a PNG strip of the first episode's rendered frames; `video`:
    that episode as an animated GIF (every 2nd step at 25 frames/s: real time for 50 Hz environments such as
    CartPole and LunarLander; Pillow writes it, no video codec needed)."""
    if not 1 <= episodes <= MAX_EVAL_EPISODES:
        raise ConfigError(f"--episodes: expected 1 .. {MAX_EVAL_EPISODES}, got {episodes}")
    if video is not None and Path(video).suffix.lower() != ".gif":
        raise ConfigError(f"--video: writes an animated GIF; give a path ending in .gif, got {video}")
    policy, meta = open_policy(run_dir, which)
    every = 2 if video else frames_every if frames else 0
    out = greedy_episodes(policy, meta["env"], episodes, seed, meta.get("max_episode_steps"), every)
    res = {"run": str(run_dir), "env": meta["env"], "algo": meta["algo"], "episodes": episodes,
           "mean": out["mean"], "std": out["std"], "returns": out["returns"]}
    if frames:
        from lamina.plots import frame_strip

        res["frames"] = str(frame_strip(out["frames"], frames, title=f"{meta['algo'].upper()} on {meta['env']}",
                                        every=every))
    if video:
        from lamina.plots import write_gif

        res["video"] = str(write_gif(out["frames"], video, fps=25))
        res["video_frames"] = len(out["frames"])
    return res


__all__ = ["evaluate_rl", "greedy_episodes", "make_env", "open_policy", "train_rl", "train_rl_seeds"]
