"""Reinforcement-learning objectives: PPO's clipped surrogate with GAE, and DQN's double-Q temporal-difference
loss over a replay buffer. Pure tensor functions and one buffer; the environment loop is lamina/runs/rl.py.

PPO (Schulman et al. 2017), advantages by GAE (Schulman et al. 2016):
    delta_t = r_t + gamma * V(s_{t+1}) * (1 - done_t) - V(s_t)
    A_t     = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}          returns R_t = A_t + V(s_t)
    loss    = -mean(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)) + vf_coef * mean((V - R)^2)
              - ent_coef * mean(entropy),        ratio = exp(logp_new - logp_old), A normalised per minibatch
A time-limit truncation is not a terminal state: its reward is bootstrapped with gamma * V(final observation)
before GAE runs (as Stable-Baselines3 does), so cutting CartPole at 500 steps does not teach "the end is bad".

DQN (Mnih et al. 2015) with double-Q targets (van Hasselt et al. 2016):
    target = r + gamma * (1 - terminal) * Q_target(s', argmax_a Q_online(s', a))      (double_q)
    target = r + gamma * (1 - terminal) * max_a Q_target(s', a)                          (plain)
    loss   = smooth_l1(Q_online(s, a), target)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (T, N), from rewards, values and done flags (T, N) and V(s_T) (N,).
    dones[t] = 1 when the episode ended at step t (the value after it is not part of this episode)."""
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    for t in reversed(range(T)):
        nxt = last_value if t == T - 1 else values[t + 1]
        keep = 1.0 - dones[t]
        delta = rewards[t] + gamma * nxt * keep - values[t]
        running = delta + gamma * lam * keep * running
        adv[t] = running
    return adv, adv + values


def ppo_loss(logits: torch.Tensor, values: torch.Tensor, actions: torch.Tensor, old_logp: torch.Tensor,
             adv: torch.Tensor, returns: torch.Tensor, clip: float, vf_coef: float, ent_coef: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped-surrogate loss of one minibatch: (loss, stats: policy, value, entropy, clip_fraction, kl)."""
    dist = torch.distributions.Categorical(logits=logits)
    logp = dist.log_prob(actions)
    ratio = (logp - old_logp).exp()
    a = (adv - adv.mean()) / (adv.std() + 1e-8) if len(adv) > 1 else adv
    policy = -torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a).mean()
    value = F.mse_loss(values, returns)
    entropy = dist.entropy().mean()
    loss = policy + vf_coef * value - ent_coef * entropy
    with torch.no_grad():
        stats = {"policy": policy, "value": value, "entropy": entropy,
                 "clip_fraction": ((ratio - 1).abs() > clip).float().mean(),
                 "kl": ((ratio - 1) - (logp - old_logp)).mean()}  # the low-variance k3 estimator
    return loss, stats


def dqn_targets(q_target_next: torch.Tensor, q_online_next: torch.Tensor | None, rewards: torch.Tensor,
                terminal: torch.Tensor, gamma: float) -> torch.Tensor:
    """TD targets (B,) from next-state Q values (B, A); q_online_next given -> double-Q action selection."""
    if q_online_next is None:
        nxt = q_target_next.max(1).values
    else:
        nxt = q_target_next.gather(1, q_online_next.argmax(1, keepdim=True)).squeeze(1)
    return rewards + gamma * (1.0 - terminal) * nxt


class RewardScaler:
    """Rewards divided by the running standard deviation of each environment's discounted return (as
    Stable-Baselines3's VecNormalize and the PPO implementations it follows): value targets stay near unit scale
    whatever the environment pays, so the value loss does not swamp the clipped policy gradient. Returns are
    reset when an episode ends; scaled rewards are clipped to +-clip."""

    def __init__(self, n: int, gamma: float, clip: float = 10.0, eps: float = 1e-8):
        self.ret = np.zeros(n)
        self.gamma, self.clip, self.eps = gamma, clip, eps
        self.count, self.mean, self.var = 1e-4, 0.0, 1.0

    def update(self, x: np.ndarray) -> None:
        """Chan et al.'s parallel update of the running mean and variance with a batch x."""
        n, m, v = len(x), float(np.mean(x)), float(np.var(x))
        delta, total = m - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + v * n + delta ** 2 * self.count * n / total) / total
        self.count = total

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        self.ret = self.ret * self.gamma + rewards
        self.update(self.ret)
        self.ret[dones] = 0.0
        return np.clip(rewards / np.sqrt(self.var + self.eps), -self.clip, self.clip).astype(np.float32)


class ReplayBuffer:
    """A circular buffer of transitions (obs, action, reward, next_obs, terminal) as preallocated tensors."""

    def __init__(self, capacity: int, obs_dim: int, seed: int = 0):
        self.capacity, self.size, self.pos = int(capacity), 0, 0
        self.obs = torch.zeros(self.capacity, obs_dim)
        self.next_obs = torch.zeros(self.capacity, obs_dim)
        self.actions = torch.zeros(self.capacity, dtype=torch.long)
        self.rewards = torch.zeros(self.capacity)
        self.terminal = torch.zeros(self.capacity)
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, obs, action: int, reward: float, next_obs, terminal: bool) -> None:
        i = self.pos
        self.obs[i] = torch.as_tensor(obs, dtype=torch.float32)
        self.next_obs[i] = torch.as_tensor(next_obs, dtype=torch.float32)
        self.actions[i], self.rewards[i], self.terminal[i] = int(action), float(reward), float(terminal)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(self.size, (n,), generator=self.generator)
        return {"obs": self.obs[idx], "actions": self.actions[idx], "rewards": self.rewards[idx],
                "next_obs": self.next_obs[idx], "terminal": self.terminal[idx]}


__all__ = ["ReplayBuffer", "RewardScaler", "dqn_targets", "gae", "ppo_loss"]
