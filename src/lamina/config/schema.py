"""Typed run config: data, model, task, optimizer, schedule, trainer, finetune, logging, cost, and the training
objectives (adversarial, distill) and the continual-learning stream.

Sections with a fixed set of fields reject unknown keys ("did you mean ..."). The `data` and `model`
sections also carry free options (e.g. `model.depth=4`) that go to the data set loader / model factory,
which validate them against their own typed configs.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, NonNegativeFloat, field_validator,
                      model_validator)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class _Open(BaseModel):
    # Free keys are options for the loader/factory named in `name`.
    model_config = ConfigDict(extra="allow", validate_assignment=True, coerce_numbers_to_str=True)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataConfig(_Open):
    name: str = "digits"  # a registered data set (`lamina data`)
    batch_size: PositiveInt = 64  # small data: many updates per epoch beat big batches here
    eval_batch_size: PositiveInt = 1024  # evaluation has no gradient memory; bigger is faster
    augment: list[dict[str, Any]] = Field(default_factory=list)  # e.g. [{name: hflip}]
    steps_per_epoch: PositiveInt | None = None  # token streams: random-window batches between evaluations
    train_fraction: float = Field(1.0, gt=0, le=1)  # learning curves / quick checks: a seeded, class-stratified
    # subset of the training split (token streams: a prefix); val and test stay whole


MODEL_SOURCE_KEYS = ("name", "pretrained", "adapter")  # model keys that say where a model comes from, not options


class ModelConfig(_Open):
    name: str = "small_cnn"  # a registered model (`lamina models`)
    # start from pretrained weights (lamina.hub source: weights package, folder or file); `name` is then ignored
    # and the pretrained model's head is replaced to fit the data
    pretrained: str | None = None
    # a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors: `lamina export RUN --format peft`,
    # or peft's) put on the pretrained base once its weights are loaded; with finetune.mode=lora training goes on
    # from it (its targets and ranks replace finetune.lora_*). Eval/generate/predict take `--adapter` instead.
    adapter: str | None = None


class FinetuneConfig(_Strict):
    # full: train everything; linear_probe: only the new head; lora: low-rank adapters + the head;
    # gradual: the head first, then one more block group from the top every `unfreeze_every` epochs (ULMFiT)
    mode: Literal["full", "linear_probe", "lora", "gradual"] = "full"
    lr_decay: float | None = Field(None, gt=0, le=1)  # layer-wise lr decay: block i from the top gets lr * decay^i
    freeze: list[str] = Field(default_factory=list)  # name patterns to keep frozen, e.g. ["blocks.0.*"]
    unfreeze_every: PositiveInt = 1  # gradual: epochs between unfreezing steps
    lora_rank: PositiveInt = 8
    lora_alpha: PositiveFloat = 16.0
    lora_targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    input_size: PositiveInt | None = None  # images: resize to this side before the model (pretrained nets want
    # more than 28 px); the pretrained preprocessing's mean/std are applied too


class TaskConfig(_Open):
    # auto: the data set's task. Free keys are options of the task (e.g. task.beam_size=4 for seq2seq).
    name: str = "auto"
    label_smoothing: NonNegativeFloat = 0.1  # regularizes over-confident logits; +0.3 pt on digits


class OptimizerConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "adamw"  # AdamW: decoupled decay, robust default
    lr: PositiveFloat = 1e-2  # peak lr of the one-cycle default; BN nets tolerate it
    weight_decay: NonNegativeFloat = 0.01  # decoupled (AdamW); not applied to biases and norm gains
    momentum: NonNegativeFloat = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    betas: tuple[float, float] = (0.9, 0.999)  # Adam/AdamW only
    # auto: Adam/AdamW use torch's fused kernel (one kernel over all parameters) where it runs (floating-point
    # parameters on CPU/CUDA/MPS), SGD its foreach form; fused/foreach/for_loop force one
    impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"


class ScheduleConfig(_Strict):
    name: Literal["constant", "step", "cosine", "onecycle", "linear"] = "onecycle"  # fastest to a good optimum on small budgets
    warmup_steps: int = Field(0, ge=0)  # linear warmup from 0 before the schedule proper
    step_size: PositiveInt = 30  # step: epochs between decays
    gamma: PositiveFloat = 0.1  # step: decay factor
    min_lr: NonNegativeFloat = 0.0  # cosine/linear floor
    pct_start: float = Field(0.3, gt=0, lt=1)  # onecycle: fraction of steps spent rising


class EarlyStoppingConfig(_Strict):
    patience: int | None = Field(None, ge=1)  # None: never stop early
    min_delta: NonNegativeFloat = 0.0
    stop_at: float | None = None  # stop once trainer.monitor reaches this value (a quality target: 1.88 val loss)


class AdversarialConfig(_Strict):
    # none: plain training. pgd: train on PGD examples (Madry et al. 2018). trades: CE(clean) + beta * KL(f(x) ||
    # f(x_adv)) with x_adv maximizing the KL (Zhang et al. 2019). Attacks act on inputs before any normalize step.
    method: Literal["none", "pgd", "trades"] = "none"
    eps: NonNegativeFloat = 0.1  # perturbation budget in input units; 0.1 of the [0, 1] pixel range (Fashion-MNIST)
    alpha: PositiveFloat | None = None  # attack step size; None: 2.5 * eps / steps (reaches the ball's edge)
    steps: PositiveInt = 7  # attack steps per batch: 7 is the usual training-time PGD budget; cost ~ (1 + steps)x
    norm: Literal["linf", "l2"] = "linf"  # L-inf: the standard image threat model
    beta: NonNegativeFloat = 6.0  # trades: weight of the robust KL term; 6 is the paper's best trade-off
    clean_fraction: float = Field(0.0, ge=0, lt=1)  # pgd: share of the loss on clean inputs (0: pure PGD-AT)
    clamp: tuple[float, float] | None = (0.0, 1.0)  # input value range kept by the attack; None: unbounded

    @model_validator(mode="after")
    def _range(self):
        if self.clamp is not None and not self.clamp[0] < self.clamp[1]:
            raise ValueError(f"clamp: expected [low, high] with low < high, got {list(self.clamp)}")
        return self


class DistillConfig(_Strict):
    # Knowledge distillation (Hinton et al. 2015): loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) *
    # the task's own loss on hard labels. The teacher is a trained run (same data and outputs), frozen in eval mode.
    teacher: str | None = None  # run folder or checkpoint of the teacher; None: no distillation
    temperature: PositiveFloat = 4.0  # softens both distributions; 2-5 is where dark knowledge shows (paper: 2-20)
    alpha: float = Field(0.9, ge=0, le=1)  # weight of the soft-target term; the T^2 factor keeps its gradient scale


class ContinualConfig(_Strict):
    # Continual learning (`lamina continual`, lamina/runs/continual.py): the run's data cut into a stream of
    # experiences, trained one after another; trainer.max_epochs is per experience.
    stream: Literal["split", "permuted"] = "split"  # split: disjoint class groups; permuted: pixels shuffled
    scenario: Literal["class", "task", "domain"] = "class"  # split: class- or task-incremental; permuted: domain
    experiences: PositiveInt = 5  # Split Fashion-MNIST: 5 experiences of 2 classes, the usual protocol
    class_order: list[int] | None = None  # split: the class sequence; None: 0, 1, ..., C-1
    strategy: Literal["naive", "replay", "ewc", "lwf", "joint"] = "naive"  # joint: all data at once (upper bound)
    buffer_size: PositiveInt = 1000  # replay: samples kept by reservoir sampling over the whole stream
    replay_batch: PositiveInt | None = None  # replay: buffer samples added to each batch; None: data.batch_size
    ewc_lambda: NonNegativeFloat = 1000.0  # EWC: weight of the quadratic penalty (Kirkpatrick et al. 2017)
    ewc_samples: PositiveInt = 1000  # EWC: samples per experience for the diagonal Fisher (per-sample gradients)
    lwf_alpha: NonNegativeFloat = 1.0  # LwF: weight of KL(old_T || new_T) from the previous model (paper's lambda_o)
    lwf_temperature: PositiveFloat = 2.0  # LwF: softening of old and new outputs (Li & Hoiem 2016 use 2)

    @model_validator(mode="after")
    def _fits(self):
        if self.stream == "permuted" and self.scenario != "domain":
            raise ValueError(f"scenario: a permuted stream keeps every class in every experience, so it is "
                             f"domain-incremental; set continual.scenario=domain, got {self.scenario}")
        if self.stream == "split" and self.scenario == "domain":
            raise ValueError("scenario: a split stream is class- or task-incremental (class or task), got domain")
        return self


class SSLConfig(_Strict):
    # Self-supervised pretraining (`lamina pretrain`, lamina/runs/ssl.py; the losses in runs/objectives/ssl.py):
    # the run's images without their labels; the encoder it leaves is a `model.pretrained` source and is probed
    # (linear + k-NN) on the labels it never saw. trainer.max_epochs counts passes over the training images.
    method: Literal["none", "simclr", "byol", "mae"] = "none"  # contrastive / non-contrastive / masked patches
    temperature: PositiveFloat = 0.5  # simclr: NT-Xent's temperature (Chen et al. 2020 use 0.5 on CIFAR-10)
    proj_dim: PositiveInt = 128  # simclr/byol: projection size (both papers: 128 / 256; 128 fits small encoders)
    proj_hidden: PositiveInt = 512  # simclr/byol: hidden width of the projector and BYOL's predictor
    momentum: float = Field(0.99, ge=0.0, lt=1.0)  # byol: target EMA at step 0, cosine-raised to 1 (paper 0.996
    # for 1000 epochs; short runs need the target to follow faster)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # simclr/byol views: resized-crop area range (0.08 erases
    # 28 px garments; 0.2 is the usual small-image choice)
    jitter: float = Field(0.4, ge=0.0, le=1.0)  # simclr/byol views: brightness/contrast strength (gray: no hue)
    jitter_p: float = Field(0.8, ge=0.0, le=1.0)  # its probability per view, SimCLR's 0.8
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0)  # mae: fraction of patches hidden from the encoder (He et al.)
    decoder_dim: PositiveInt = 64  # mae: the light decoder's width (half the encoder's; MAE's decoder is < 10%
    # of the compute)
    decoder_depth: PositiveInt = 2  # mae: decoder blocks
    decoder_heads: PositiveInt = 4
    norm_pix: bool = True  # mae: predict each patch's normalized pixels (He et al.: +0.5-1 pt linear probe)
    knn_k: PositiveInt = 20  # probe: neighbours of the weighted k-NN classifier (Wu et al. 2018 use 200 on
    # ImageNet; 20 on 10-class sets)
    knn_temperature: PositiveFloat = 0.07  # probe: weight exp(cos / T) of each neighbour's vote

    @model_validator(mode="after")
    def _ranges(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale: expected 0 < low <= high <= 1, got {list(self.crop_scale)}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim: {self.decoder_dim} must be divisible by decoder_heads "
                             f"({self.decoder_heads})")
        return self


class FederatedConfig(_Strict):
    # Federated learning on Flower (`lamina federated`, lamina/runs/federated.py): the training split cut into
    # `clients` partitions; each round Flower samples clients, each trains `local_epochs` on its own partition
    # from the global weights, the strategy aggregates; the global model is tested centrally after every round.
    strategy: Literal["fedavg", "fedprox"] = "fedavg"  # fedprox: FedAvg + a proximal term against client drift
    mu: NonNegativeFloat = 0.1  # fedprox: weight of mu/2 ||w - w_global||^2 (Li et al. 2020 tune 0.001-1)
    clients: PositiveInt = 10  # partitions of the training split, one per client
    split: Literal["iid", "dirichlet"] = "iid"  # dirichlet: per-class client shares ~ Dir(alpha) (Hsu et al. 2019)
    alpha: PositiveFloat = 0.3  # dirichlet concentration: 100 is near IID, 0.1 leaves most clients 1-2 classes
    min_client_samples: PositiveInt = 10  # dirichlet: redraw until every client holds at least this many
    rounds: PositiveInt = 20  # server rounds (one global model update each)
    fraction_fit: float = Field(1.0, gt=0, le=1)  # client sampling: share of clients asked to train each round
    min_fit_clients: PositiveInt = 2  # a round samples at least this many (Flower's min_fit_clients)
    local_epochs: PositiveInt = 1  # passes over its own data a client makes per round (trainer.max_epochs unused)
    dropout_client: int | None = Field(None, ge=0)  # this client drops out mid-fit in `dropout_round` (a failure)
    dropout_round: PositiveInt | None = None  # the round it drops out in; the round goes on with the others
    dropout_prob: float = Field(0.0, ge=0, lt=1)  # any sampled client drops out mid-fit with this probability
    clip: PositiveFloat | None = None  # DP: clip each client's update to this L2 norm (Flower's server-side clipping)
    noise: NonNegativeFloat = 0.0  # DP: Gaussian noise multiplier on the clipped mean (needs clip)
    engine: Literal["inprocess", "processes"] = "inprocess"  # processes: Flower's gRPC server + client processes
    address: str = "127.0.0.1:0"  # processes: where the gRPC server listens; port 0 picks a free one
    round_timeout: PositiveFloat = 600.0  # processes: seconds a round waits for a client before counting it failed
    seed: int | None = None  # partitions, sampling, dropouts; None: the run's seed

    @model_validator(mode="after")
    def _fits(self):
        if self.min_fit_clients > self.clients:
            raise ValueError(f"min_fit_clients: {self.min_fit_clients} is more than the {self.clients} clients; "
                             f"expected at most {self.clients}")
        if self.dropout_client is not None and self.dropout_client >= self.clients:
            raise ValueError(f"dropout_client: client {self.dropout_client} does not exist; expected 0 to "
                             f"{self.clients - 1}")
        if (self.dropout_client is None) != (self.dropout_round is None):
            raise ValueError("dropout_client and dropout_round: set both (which client drops out, in which round) "
                             "or neither")
        if self.dropout_round is not None and self.dropout_round > self.rounds:
            raise ValueError(f"dropout_round: {self.dropout_round} is after the last round {self.rounds}")
        if self.noise > 0 and self.clip is None:
            raise ValueError("noise: differential-privacy noise is scaled by the clipping norm; set federated.clip too")
        return self


class FewShotConfig(_Strict):
    # Few-shot learning (`lamina fewshot`, lamina/runs/fewshot.py): train on some classes, test N-way K-shot
    # episodes on classes never seen in training. data.name=omniglot: train on the minimal background set small1,
    # test on the characters of small2's alphabets that small1 lacks, plus Lake et al.'s twenty 20-way runs.
    # protonet: prototypical networks; anil: MAML with only the head adapted (torch.func); baseline: supervised
    # pretraining + a head fitted per episode
    method: Literal["protonet", "anil", "baseline"] = "protonet"
    inner_steps: PositiveInt = 10  # anil: SGD steps on each episode's support
    inner_lr: PositiveFloat = 0.1  # anil: their step size (0.1 x 10 beat 0.5 x 5 on held-out digits: 54% vs 36%)
    head: Literal["centroid", "logistic"] = "centroid"  # baseline's per-episode classifier on frozen embeddings
    train_classes: list[int] | None = None  # other data sets: the classes to train on (None: the first half)
    ways: PositiveInt = 5  # test episodes: classes per episode
    shots: PositiveInt = 1  # test episodes: labelled samples per class
    queries: PositiveInt = 15  # samples per class to classify in each episode
    train_ways: PositiveInt | None = None  # protonet training episodes (Snell et al. train wider than they test)
    train_shots: PositiveInt | None = None  # None: `shots`
    train_queries: PositiveInt | None = None  # None: `queries`; fewer make a training episode cheaper
    episodes: PositiveInt = 2000  # protonet: training episodes (trainer.max_epochs passes over them)
    test_episodes: int = Field(600, ge=1, le=100_000)  # 600 or more for a tight 95% interval
    within_alphabet: bool = False  # omniglot: draw each episode's classes from one alphabet (harder)
    size: PositiveInt = 28  # omniglot: image side after resizing the 105 px originals


class PerfConfig(_Strict):
    # The speed preset (engine/perf.py), resolved at setup against the model and the hardware; the run prints
    # what it applied and why anything was skipped. Each item can be turned off on its own.
    enabled: bool = False  # `trainer.perf: true|false` is shorthand; runs (RunConfig) default to true
    bf16: bool = True  # bf16 autocast where the hardware has native bf16 (CPU AVX512-BF16/AMX/ARM bf16, CUDA);
    # else fp16 + loss scaling on CUDA. Turns trainer.precision fp32 into bf16; an explicit bf16/fp16 stays
    channels_last: bool = True  # NHWC for models with 2-D convolutions
    compile: Literal["auto", "always", "never"] = "auto"  # auto: on CUDA; on CPU only when measured to pay


class TrainerConfig(_Strict):
    max_epochs: PositiveInt = 20  # the default job (digits) needs ~20 short epochs
    max_steps: PositiveInt | None = None  # stop after this many optimizer steps
    grad_clip: PositiveFloat | None = None  # max global grad norm
    accumulate: PositiveInt = 1  # micro-batches per optimizer step
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 needs CUDA (GradScaler)
    compile: bool = False  # torch.compile the model
    channels_last: bool = False  # NHWC memory layout for conv nets: ~25% faster on CPU (oneDNN) and tensor cores
    deterministic: bool = False  # deterministic kernels: bit-exact repeats, sometimes slower
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    monitor: str = "val/loss"  # metric that picks the best checkpoint and early stopping
    monitor_mode: Literal["min", "max"] = "min"
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    val_every: PositiveInt = 1  # epochs between validations
    log_every: PositiveInt = 20  # steps between train-loss log rows
    progress: bool = True  # live progress bar (CLI)
    threads: PositiveInt | None = None  # torch intra-op threads; None keeps torch's default
    # auto: DDP when launched by torchrun with > 1 process, else one process. fsdp: FSDP2 (fully_shard) with
    # sharded DCP checkpoints. data.batch_size stays the global batch whatever the number of processes.
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    context_parallel: PositiveInt = 1  # ranks that split each sequence (ring attention; GPT/Llama language models)
    perf: PerfConfig = Field(default_factory=PerfConfig)  # the speed preset; on by default in runs (RunConfig)

    @field_validator("perf", mode="before")
    @classmethod
    def _perf_shorthand(cls, v):
        if isinstance(v, bool):
            return {"enabled": v}
        if v is not None and not isinstance(v, (dict, PerfConfig)):
            raise ValueError(f"expected true, false or a mapping (enabled, bf16, channels_last, compile), got {v!r}")
        return v


LOGGERS = ("tensorboard", "mlflow")  # metrics.csv and steps.csv are always written


class MLflowConfig(_Strict):
    # None: a local store without a server, sqlite:///<logging.root>/mlflow.db (artifacts in <root>/mlartifacts);
    # or any URI MLflow opens: sqlite:///<file>, http(s)://<server>, postgresql://..., a folder (file store; MLflow 3
    # refuses one unless MLFLOW_ALLOW_FILE_STORE=true)
    tracking_uri: str | None = None
    experiment: str = "lamina"


class LoggingConfig(_Strict):
    root: str = "runs"  # run folders go to <root>/<name>
    loggers: list[str] = Field(default_factory=lambda: ["tensorboard"])  # where metrics go besides the CSVs
    # shorthand: true adds tensorboard to `loggers`, false drops it; None (unset) leaves `loggers` as it is
    tensorboard: bool | None = None
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)  # used when `loggers` has mlflow
    plots: bool = True

    @field_validator("loggers", mode="before")
    @classmethod
    def _logger_names(cls, v):
        names = [v] if isinstance(v, str) else v
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"expected a list of logger names from {', '.join(LOGGERS)}, got {v!r}")
        bad = [n for n in names if n not in LOGGERS]
        if bad:
            raise ValueError(f"unknown logger {bad[0]!r}; accepted: {', '.join(LOGGERS)}")
        return list(dict.fromkeys(names))

    def active(self) -> list[str]:
        """The loggers this run writes to: `loggers` with the `tensorboard` shorthand applied."""
        out = [n for n in self.loggers if n != "tensorboard" or self.tensorboard is not False]
        return ["tensorboard", *out] if self.tensorboard and "tensorboard" not in out else out


@functools.lru_cache(maxsize=1)
def codecarbon_countries() -> frozenset[str] | None:
    """The 3-letter ISO codes CodeCarbon has a grid carbon intensity for (its global energy-mix table), read from
    the installed package's data without importing it; None when CodeCarbon is not installed."""
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("codecarbon")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        try:
            return frozenset(json.loads((Path(root) / "data/private_infra/global_energy_mix.json").read_text()))
        except (OSError, ValueError):
            continue
    return None


class CostConfig(_Strict):
    # What a run cost (runs/cost.py): CodeCarbon's energy/CO2e around fit (rank 0) and the model's FLOPs
    energy: bool = True  # cheap (a probe thread during data loading, a 1 s sampler); needs lamina[cost]
    country: str = "USA"  # 3-letter ISO code of where the power comes from: picks the grid's g CO2e per kWh
    flops: bool = True  # one forward + one forward/backward on a real batch before training: about one step

    @field_validator("country", mode="before")
    @classmethod
    def _country(cls, v):
        code = str(v).strip().upper()
        known = codecarbon_countries()
        if len(code) != 3 or not code.isalpha() or (known is not None and code not in known):
            raise ValueError(f"expected a 3-letter ISO country code CodeCarbon knows (e.g. USA, FRA, DEU, GBR, IND, "
                             f"CHN), got {v!r}")
        return code


class RLConfig(_Strict):
    # Reinforcement learning (`lamina rl train`, lamina/runs/rl.py) on a Gymnasium environment; the networks are
    # zoo MLPs (model.width, model.depth, model.activation). Defaults follow RL Zoo's tuned CartPole settings.
    env: str = "CartPole-v1"  # a registered Gymnasium id with a flat Box observation and a Discrete action space
    algo: Literal["ppo", "dqn"] = "ppo"
    total_steps: PositiveInt = 100_000  # environment steps over all parallel environments
    num_envs: PositiveInt = 8  # PPO: parallel environments (gymnasium.vector.SyncVectorEnv); DQN uses 1
    # None: the algorithm's default (RL Zoo's CartPole values): gamma ppo 0.98 / dqn 0.99; lr ppo 1e-3 (annealed
    # linearly to 0) / dqn 2.3e-3; gradient clipping at a global norm of ppo 0.5 / dqn 10
    gamma: float | None = Field(None, gt=0, le=1)
    lr: PositiveFloat | None = None
    max_grad_norm: PositiveFloat | None = None
    anneal_lr: bool = True  # PPO: decay the learning rate linearly to 0 over the run
    normalize_reward: bool = False  # PPO: divide rewards by the running std of the discounted return (VecNormalize)
    # PPO (Schulman et al. 2017): n_steps per env per rollout, `epochs` passes in `minibatches` over it
    n_steps: PositiveInt = 32
    epochs: PositiveInt = 20
    minibatches: PositiveInt = 1
    clip: PositiveFloat = 0.2  # clipped surrogate ratio range
    gae_lambda: float = Field(0.8, ge=0, le=1)  # GAE (Schulman et al. 2016): bias/variance of advantages
    ent_coef: NonNegativeFloat = 0.0
    vf_coef: PositiveFloat = 0.5
    # DQN (Mnih et al. 2015) with double-Q targets (van Hasselt et al. 2016)
    buffer_size: PositiveInt = 100_000
    learning_starts: int = Field(1000, ge=0)  # random steps before the first update
    batch_size: PositiveInt = 64
    train_freq: PositiveInt = 256  # env steps between update phases
    gradient_steps: PositiveInt = 128  # updates per phase
    target_update: PositiveInt = 10  # environment steps between copies to the target network (as SB3)
    exploration_fraction: float = Field(0.16, gt=0, le=1)  # share of total_steps over which epsilon decays
    exploration_final: float = Field(0.04, ge=0, le=1)
    double_q: bool = True
    # evaluation: greedy episodes on a separately seeded environment
    eval_every: PositiveInt = 10_000  # environment steps between evaluations
    eval_episodes: PositiveInt = 10
    max_episode_steps: PositiveInt | None = None  # override the env's time limit


class RunConfig(_Strict):
    name: str | None = None  # run folder name; default <data>-<model>-<time>
    seed: int = Field(0, ge=0, lt=2**63)  # torch.manual_seed takes a 64-bit seed
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    cost: CostConfig = Field(default_factory=CostConfig)  # energy, CO2e and FLOPs in summary.json
    # Training objectives (lamina/runs/objectives): each wraps the task when its section is set
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)  # adversarial training (PGD-AT, TRADES)
    distill: DistillConfig = Field(default_factory=DistillConfig)  # learn from a teacher run's soft targets
    continual: ContinualConfig = Field(default_factory=ContinualConfig)  # used by `lamina continual` only
    fewshot: FewShotConfig = Field(default_factory=FewShotConfig)  # used by `lamina fewshot` only
    ssl: SSLConfig = Field(default_factory=SSLConfig)  # self-supervised pretraining objective (SimCLR, BYOL, MAE)
    federated: FederatedConfig = Field(default_factory=FederatedConfig)  # used by `lamina federated` only
    rl: RLConfig = Field(default_factory=RLConfig)  # used by `lamina rl` only

    @model_validator(mode="before")
    @classmethod
    def _perf_on_for_runs(cls, data):
        """Runs (CLI, YAML, RunConfig()) use the speed preset unless trainer.perf says otherwise; a bare
        Trainer() in Python stays plain fp32 eager unless given perf=True."""
        trainer = data.get("trainer") if isinstance(data, dict) else None
        if isinstance(data, dict) and (trainer is None or isinstance(trainer, dict)):
            perf = (trainer or {}).get("perf", {})
            if isinstance(perf, dict) and "enabled" not in perf:  # `trainer.perf.compile=never` alone keeps it on
                data = {**data, "trainer": {**(trainer or {}), "perf": {**perf, "enabled": True}}}
        return data

# Sections that moved; old configs and run folders that still use them are read with a deprecation warning.
MOVED = {("trainer", "adversarial"): "adversarial", ("trainer", "distill"): "distill"}
