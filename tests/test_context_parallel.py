"""Context parallelism (lamina.engine.context_parallel): GPT and Llama over 2 gloo processes equal one process.

Each spawned rank builds the same tiny model and batch from fixed seeds, computes the single-process loss and
gradients on the full batch, then applies context parallelism, runs the language-modeling task on its zigzag
shard and averages loss and gradients over the group (what DDP does): both must match within 1e-5.
"""

from __future__ import annotations

import datetime
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lamina.engine.context_parallel import apply_context_parallel, remove_context_parallel, shard_batch
from lamina.errors import DataError, InputShapeError, ModelError
from lamina.models import create_model
from lamina.nn.ring_attention import zigzag_unshard
from lamina.tasks.language_modeling import LanguageModelingTask

TOL = 1e-5
V, L = 50, 24  # vocab, global sequence length (2 ranks: 4 zigzag chunks of 6)
MODELS = {
    "gpt": dict(vocab_size=V, n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0),
    "llama": dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32),
}


def _batch(seed=1, B=2):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randint(0, V, (B, L), generator=g), "y": torch.randint(0, V, (B, L), generator=g)}


def _loss_and_grads(model, task, batch):
    model.zero_grad(set_to_none=True)
    loss = task.loss(task.forward(model, batch), batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def cp_worker(rank, world_size, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        res = {}
        for family, kw in MODELS.items():
            torch.manual_seed(0)
            model, task, batch = create_model(family, **kw), LanguageModelingTask(V), _batch()
            ref_loss, ref_grads = _loss_and_grads(model, task, batch)  # one process, the whole sequence
            ref_logits = model(batch["x"]).detach()

            apply_context_parallel(model)
            local, positions = shard_batch(batch, layout="zigzag")
            loss, grads = _loss_and_grads(model, task, local)
            dist.all_reduce(loss)  # equal token counts per rank: mean of the means = the global mean
            for g in grads.values():
                dist.all_reduce(g)  # DDP's average over the group
            loss, grads = loss / world_size, {n: g / world_size for n, g in grads.items()}
            mine = model(local["x"], positions=positions).detach()  # (B, L / N, V)
            logits = [torch.empty_like(mine) for _ in range(world_size)]
            dist.all_gather(logits, mine)
            cp_logits = zigzag_unshard(logits, 1, world_size)  # (B, L, V) in sequence order

            remove_context_parallel(model)
            res[family] = {
                "loss": abs(loss - ref_loss).item(),
                "logits": (cp_logits - ref_logits).abs().max().item(),
                "grad": max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads),
                "worst_param": max(ref_grads, key=lambda n: (grads[n] - ref_grads[n]).abs().max().item()),
                "n_params": len(ref_grads),
                "removed": (model(batch["x"]).detach() - ref_logits).abs().max().item(),
            }
        (tmp / f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_gpt_and_llama_under_context_parallel_equal_one_process(tmp_path):
    mp.spawn(cp_worker, args=(2, tmp_path), nprocs=2, join=True)
    for r in range(2):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        for family, e in res.items():
            for key in ("loss", "logits", "grad", "removed"):
                assert e[key] <= TOL, f"rank {r} {family}: {key} max abs error {e[key]:.3g} ({e})"


def test_one_rank_is_the_plain_model():
    torch.manual_seed(0)
    model, task, batch = create_model("llama", **MODELS["llama"]), LanguageModelingTask(V), _batch()
    want = task.loss(task.forward(model, batch), batch)
    apply_context_parallel(model)  # no process group: a ring of one
    local, positions = shard_batch(batch)
    assert positions.tolist() == list(range(L)) and torch.equal(local["x"], batch["x"])
    assert (task.loss(task.forward(model, local), local) - want).abs().item() <= TOL


def test_unsupported_models_and_batches_are_rejected():
    with pytest.raises(ModelError, match=r"model mlp is not supported \(has no MultiHeadAttention\).*"
                                         r"the gpt, llama families"):
        apply_context_parallel(create_model("mlp"))
    with pytest.raises(ModelError, match=r"model bert_mini is not supported \(has non-causal attention"):
        apply_context_parallel(create_model("bert_mini"))
    with pytest.raises(ModelError, match=r"attention dropout 0.1 .*build it with dropout=0"):
        apply_context_parallel(create_model("gpt", dropout=0.1))
    with pytest.raises(InputShapeError, match=r"sequence length 23 does not split into 2\*world_size = 2"):
        shard_batch({"x": torch.zeros(2, 23, dtype=torch.long), "y": torch.zeros(2, 23, dtype=torch.long)})
    with pytest.raises(DataError, match="batch has no 'y'"):
        shard_batch({"x": torch.zeros(2, 24, dtype=torch.long)})
