"""PPO and DQN on CartPole-v1 (issue 18): lamina against Stable-Baselines3 with the same hyperparameters (RL Zoo's
tuned CartPole settings, configs/cartpole_ppo.yaml and configs/cartpole_dqn.yaml), the same number of environment
steps and the same greedy evaluation, seeds run back to back in one process.

    python benchmarks/rl_cartpole.py [--seeds 0,1,2] [--algos ppo,dqn] [--threads 1] [--work /tmp/rl-bench]

For each algorithm and seed: greedy evaluation returns (10 episodes on separately seeded environments, every
10k steps for PPO and 5k for DQN; lamina.runs.rl.greedy_episodes for both libraries), the best and final
evaluation, training steps/s (evaluation time excluded) and the steps to the first evaluation at 500 (solved).
Plots mean evaluation return against steps with a 95% confidence band over seeds (t interval) per library.
Writes benchmarks/results/rl_cartpole.json and rl_cartpole.png. Load averages are recorded; a start above the
core count is flagged.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, RESULTS, loadavg1, machine, print_table, start_work, write_result  # noqa: E402

CONFIGS = {"ppo": "cartpole_ppo.yaml", "dqn": "cartpole_dqn.yaml"}


def run_lamina(algo: str, seed: int, work: Path) -> dict:
    from lamina.config import load_config
    from lamina.runs.rl import train_rl

    cfg = load_config(str(ROOT / "configs" / CONFIGS[algo]), [f"seed={seed}", f"logging.root={work}",
                                                             f"name=lamina-{algo}-{seed}"])
    s = train_rl(cfg)
    return {"evals": s["evals"], "steps_per_s": s["steps_per_s"], "wall_s": s["wall_s"], "eval_s": s["eval_s"]}


class _Greedy(torch.nn.Module):
    """An SB3 policy as a module returning Q values / logits, so both libraries share one evaluation."""

    def __init__(self, model, algo: str):
        super().__init__()
        self.model, self.algo = model, algo

    def forward(self, obs):
        p = self.model.policy
        if self.algo == "dqn":
            return p.q_net(obs)
        return p.get_distribution(obs).distribution.logits


def run_sb3(algo: str, seed: int) -> dict:
    from stable_baselines3 import DQN, PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    from lamina.config import load_config
    from lamina.runs.rl import DEFAULTS, greedy_episodes

    r = load_config(str(ROOT / "configs" / CONFIGS[algo]), []).rl
    d = DEFAULTS[algo]
    if algo == "ppo":
        env = make_vec_env(r.env, n_envs=r.num_envs, seed=seed)
        model = PPO("MlpPolicy", env, n_steps=r.n_steps, batch_size=r.n_steps * r.num_envs // r.minibatches,
                    n_epochs=r.epochs, gamma=d["gamma"], gae_lambda=r.gae_lambda, clip_range=r.clip,
                    ent_coef=r.ent_coef, vf_coef=r.vf_coef, max_grad_norm=d["max_grad_norm"],
                    learning_rate=lambda f: d["lr"] * f, seed=seed, device="cpu", verbose=0)
    else:
        env = make_vec_env(r.env, n_envs=1, seed=seed)
        model = DQN("MlpPolicy", env, learning_rate=d["lr"], buffer_size=r.buffer_size,
                    learning_starts=r.learning_starts, batch_size=r.batch_size, gamma=d["gamma"],
                    train_freq=r.train_freq, gradient_steps=r.gradient_steps,
                    target_update_interval=r.target_update, exploration_fraction=r.exploration_fraction,
                    exploration_final_eps=r.exploration_final, max_grad_norm=d["max_grad_norm"],
                    policy_kwargs={"net_arch": [256, 256]}, seed=seed, device="cpu", verbose=0)
    evals: list[dict] = []
    spent = {"eval_s": 0.0}

    class Eval(BaseCallback):
        def __init__(self):
            super().__init__()
            self.next = r.eval_every

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next:
                t = time.perf_counter()
                e = greedy_episodes(_Greedy(self.model, algo), r.env, r.eval_episodes, seed + 10_000)
                evals.append({"step": int(self.num_timesteps), "mean": e["mean"], "std": e["std"]})
                spent["eval_s"] += time.perf_counter() - t
                while self.next <= self.num_timesteps:
                    self.next += r.eval_every
            return True

    t0 = time.perf_counter()
    model.learn(total_timesteps=r.total_steps, callback=Eval())
    wall = time.perf_counter() - t0
    return {"evals": evals, "steps_per_s": r.total_steps / (wall - spent["eval_s"]), "wall_s": wall,
            "eval_s": spent["eval_s"]}


def first_solved(evals: list[dict], target: float = 500.0):
    return next((e["step"] for e in evals if e["mean"] >= target), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/rl-bench")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--algos", default="ppo,dqn")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both libraries (tiny MLPs: 1)")
    ap.add_argument("--json", help="result path (default benchmarks/results/rl_cartpole.json)")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the plot of an earlier result, run nothing")
    a = ap.parse_args()
    if a.plot_only:
        import json

        plot(json.loads(Path(a.plot_only).read_text()), Path(a.plot_only).with_suffix(".png"))
        return 0
    work, load0 = start_work(a.work)
    torch.set_num_threads(a.threads)
    import stable_baselines3

    result: dict = {"load_before": load0, "args": vars(a), "machine": machine(),
                    "stable_baselines3": stable_baselines3.__version__, "runs": []}
    seeds = [int(s) for s in a.seeds.split(",")]
    for algo in a.algos.split(","):
        for seed in seeds:
            for lib, fn in (("lamina", lambda: run_lamina(algo, seed, work)), ("sb3", lambda: run_sb3(algo, seed))):
                l0 = loadavg1()
                res = fn()
                res.update(lib=lib, algo=algo, seed=seed, load=[l0, loadavg1()],
                           best=max(e["mean"] for e in res["evals"]), final=res["evals"][-1]["mean"],
                           solved_at=first_solved(res["evals"]))
                result["runs"].append(res)
                print(f"{algo} seed {seed} {lib}: best {res['best']:.1f} final {res['final']:.1f} solved at "
                      f"{res['solved_at']} ({res['steps_per_s']:.0f} steps/s, load {l0:.2f})", flush=True)
    rows, summary = [], {}
    for algo in a.algos.split(","):
        for lib in ("lamina", "sb3"):
            rs = [x for x in result["runs"] if x["algo"] == algo and x["lib"] == lib]
            s = {"final_mean": statistics.mean(x["final"] for x in rs),
                 "final_std": statistics.pstdev(x["final"] for x in rs),
                 "best_mean": statistics.mean(x["best"] for x in rs),
                 "solved": sum(x["solved_at"] is not None for x in rs), "seeds": len(rs),
                 "steps_per_s_median": statistics.median(x["steps_per_s"] for x in rs)}
            summary[f"{algo}/{lib}"] = s
            rows.append([algo, lib, s["final_mean"], s["final_std"], s["best_mean"], f"{s['solved']}/{len(rs)}",
                         s["steps_per_s_median"]])
        lam, sb = summary[f"{algo}/lamina"], summary[f"{algo}/sb3"]
        summary[f"{algo}/speed_ratio_lamina_over_sb3"] = lam["steps_per_s_median"] / sb["steps_per_s_median"]
    result["summary"] = summary
    print_table(["algo", "library", "final eval", "std", "best eval", "solved (500)", "steps/s"], rows)
    result["load_after"] = loadavg1()
    plot(result, Path(a.json).with_suffix(".png") if a.json else RESULTS / "rl_cartpole.png")  # 95% t bands
    write_result("rl_cartpole", result, a.json)
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    algos = sorted({x["algo"] for x in result["runs"]}, key=["ppo", "dqn"].index)
    fig, axes = plt.subplots(1, len(algos), figsize=(5.2 * len(algos), 3.8), squeeze=False)
    for ax, algo in zip(axes[0], algos):
        for lib, color in (("lamina", "tab:blue"), ("sb3", "tab:orange")):
            rs = [x for x in result["runs"] if x["algo"] == algo and x["lib"] == lib]
            n = min(len(x["evals"]) for x in rs)
            steps = np.array([e["step"] for e in rs[0]["evals"][:n]])
            m = np.array([[e["mean"] for e in x["evals"][:n]] for x in rs])
            mu = m.mean(0)
            half = (stats.t.ppf(0.975, len(rs) - 1) * m.std(0, ddof=1) / np.sqrt(len(rs))) if len(rs) > 1 else 0 * mu
            ax.plot(steps, mu, color=color, label=f"{'lamina' if lib == 'lamina' else 'Stable-Baselines3'} "
                                                  f"({len(rs)} seeds)")
            # CartPole's returns lie in [0, 500]: the t interval of 3 seeds is cut to that range
            ax.fill_between(steps, np.maximum(mu - half, 0), np.minimum(mu + half, 500), color=color, alpha=0.2)
        ax.set_title(f"{algo.upper()} on CartPole-v1")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("greedy return (10 episodes)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
