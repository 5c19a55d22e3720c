"""Recommendation (issue 18): ranking metrics, leave-last-out, negative sampling, the recommenders and baselines
against hand computations; bad interaction files as one-line errors; `lamina train` + `lamina recommend` end to
end on the committed MovieTweetings subset, beating the popularity baseline."""

from __future__ import annotations

import gzip
import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from lamina.cli.main import main
from lamina.data.interactions import UserItems, interactions
from lamina.errors import ConfigError, DataError, ModelError
from lamina.models import create_model
from lamina.models.recsys import ItemKNN, Popularity
from lamina.tasks.recommendation import (RankingMetrics, RecommendationTask, RecOutput, evaluate_ranking, mask_seen,
                                         ranking_metrics)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "movietweetings_recsys.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----- ranking metrics -------------------------------------------------------------------------------------
def test_recall_and_ndcg_by_hand():
    # row 0: target item 1 scores 0.5; 0.9 and 0.7 are above it -> rank 3
    # row 1: target item 3 is the best -> rank 1; row 2: item 0 would beat the target but is left out (-inf)
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1],
                           [0.2, 0.3, 0.1, 0.8],
                           [float("-inf"), 0.1, 0.4, 0.3]])
    m = ranking_metrics(scores, torch.tensor([1, 3, 3]), ks=(1, 2, 3))
    assert m["rank"].tolist() == [3.0, 1.0, 2.0]
    assert m["recall@1"].tolist() == [0.0, 1.0, 0.0]
    assert m["recall@2"].tolist() == [0.0, 1.0, 1.0]
    assert m["recall@3"].tolist() == [1.0, 1.0, 1.0]
    assert m["ndcg@2"].tolist() == pytest.approx([0.0, 1.0, 1 / math.log2(3)])
    assert m["ndcg@3"].tolist() == pytest.approx([1 / math.log2(4), 1.0, 1 / math.log2(3)])
    acc = RankingMetrics(ks=(2, 3))
    acc.update(scores[:2], torch.tensor([1, 3]))
    acc.update(scores[2:], torch.tensor([3]))
    out = acc.compute()
    assert out["recall@2"] == pytest.approx(2 / 3)
    assert out["ndcg@3"] == pytest.approx((0.5 + 1 + 1 / math.log2(3)) / 3)


def test_ties_count_as_the_expectation_over_random_orders():
    # target tied with two others at the top: rank 1, 2 or 3 with probability 1/3 each
    m = ranking_metrics(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), torch.tensor([0]), ks=(1, 2))
    assert m["recall@1"].item() == pytest.approx(1 / 3)
    assert m["recall@2"].item() == pytest.approx(2 / 3)
    assert m["ndcg@1"].item() == pytest.approx(1 / 3)
    assert m["ndcg@2"].item() == pytest.approx((1 + 1 / math.log2(3)) / 3)
    # brute force: average the metric over every order of every tie, random integer scores
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (30, 6), generator=g).float()
    target = torch.randint(0, 6, (30,), generator=g)
    m = ranking_metrics(scores, target, ks=(1, 3))
    for b in range(30):
        s, t = scores[b].tolist(), int(target[b])
        recalls, ndcgs = [], []
        for perm in itertools.permutations(range(6)):  # a random tie-break = a random secondary key
            order = sorted(range(6), key=lambda i: (-s[i], perm[i]))
            r = order.index(t) + 1
            recalls.append(r <= 3)
            ndcgs.append(1 / math.log2(r + 1) if r <= 3 else 0.0)
        assert m["recall@3"][b].item() == pytest.approx(sum(recalls) / len(recalls))
        assert m["ndcg@3"][b].item() == pytest.approx(sum(ndcgs) / len(ndcgs))


def test_mask_seen_leaves_out_padded_items():
    s = torch.arange(8.0).reshape(2, 4)
    out = mask_seen(s, torch.tensor([[1, 3], [4, 4]]))  # 4 = padding
    assert out[0].tolist() == [0.0, float("-inf"), 2.0, float("-inf")] and out[1].tolist() == [4, 5, 6, 7]


# ----- leave-last-out --------------------------------------------------------------------------------------
def test_leave_last_out_on_a_hand_made_table(tmp_path):
    # user a: b0 (t=5), b1 (t=1), b2 (t=3), b3 (t=9), b1 again (t=7, a repeat: dropped) -> time order b1 b2 b0 b3
    # user c: ties at t=2 keep file order: b2, b0, then b1 (t=4)
    f = write(tmp_path / "i.csv", "user,item,t\na,b0,5\na,b1,1\nc,b2,2\na,b2,3\nc,b0,2\na,b3,9\na,b1,7\nc,b1,4\n")
    b = interactions(path=f, user_col="user", item_col="item", time_col="t")
    users, items = list(b.extras["user_ids"]), list(b.extras["item_ids"])

    def pairs(split):
        return [(users[u], items[i]) for u, i in zip(split.tensors["user"].tolist(), split.tensors["item"].tolist())]

    assert pairs(b.train) == [("a", "b1"), ("a", "b2"), ("c", "b2")]
    assert pairs(b.val) == [("a", "b0"), ("c", "b0")]
    assert pairs(b.test) == [("a", "b3"), ("c", "b1")]
    assert b.meta["n_users"] == 2 and b.meta["n_items"] == 4 and b.meta["repeats_dropped"] == 1
    # no time column: the file order is the order
    b = interactions(path=f, user_col="user", item_col="item", time_col=None)
    assert pairs(b.test) == [("a", "b3"), ("c", "b1")] and pairs(b.val) == [("a", "b2"), ("c", "b0")]


def test_the_committed_subset_and_its_split():
    b = interactions()
    assert (b.meta["n_users"], b.meta["n_items"], b.meta["interactions"]) == (4333, 2414, 68055)
    assert len(b.val) == len(b.test) == 4333 and len(b.train) == 68055 - 2 * 4333
    assert b.extras["titles"][list(b.extras["item_ids"]).index("0133093")] == "The Matrix (1999)"
    seen = UserItems.from_pairs(b.train.tensors["user"], b.train.tensors["item"], 4333, 2414)
    assert not seen.contains(b.test.tensors["user"], b.test.tensors["item"]).any()  # held-out pairs are new


# ----- negative sampling -------------------------------------------------------------------------------------
def _random_user_items(n_users=40, n_items=30, seed=0) -> tuple[UserItems, list[set]]:
    g = torch.Generator().manual_seed(seed)
    sets = []
    for u in range(n_users):  # from 0 to n_items - 1 positives: the densest user leaves one item free
        k = int(torch.randint(0, n_items, (1,), generator=g))
        sets.append(set(torch.randperm(n_items, generator=g)[:k].tolist()))
    users = torch.tensor([u for u, s in enumerate(sets) for _ in s])
    items = torch.tensor([i for s in sets for i in sorted(s)])
    return UserItems.from_pairs(users, items, n_users, n_items), sets


def test_nth_unseen_matches_brute_force_for_every_rank():
    ui, sets = _random_user_items()
    for u, s in enumerate(sets):
        unseen = [i for i in range(30) if i not in s]
        r = torch.arange(len(unseen))[None, :]
        assert ui.nth_unseen(torch.tensor([u]), r)[0].tolist() == unseen


def test_negative_sampling_never_returns_a_positive_and_is_uniform():
    ui, sets = _random_user_items()
    users = torch.arange(40).repeat_interleave(50)
    neg = ui.sample_negatives(users, 40, torch.Generator().manual_seed(1))  # 80,000 draws
    assert neg.shape == (2000, 40)
    assert not ui.contains(users, neg).any()
    for u, s in enumerate(sets):
        draws = neg[users == u].flatten()
        assert not (set(draws.tolist()) & s)
        counts = torch.bincount(draws, minlength=30).float()[[i for i in range(30) if i not in s]]
        assert counts.sum() == 2000 and counts.min() > 0  # every unseen item can be drawn
        assert (counts - counts.mean()).abs().max() < 5 * counts.mean().sqrt() + 1  # uniform within noise


# ----- models and baselines by hand -------------------------------------------------------------------------
def test_mf_score_is_dot_plus_biases():
    m = create_model("mf", n_users=3, n_items=4, dim=2)
    with torch.no_grad():
        m.user.weight.copy_(torch.tensor([[1.0, 2.0], [0.5, -1.0], [0.0, 3.0]]))
        m.item.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 1.0]]))
        m.user_bias.weight.copy_(torch.tensor([[0.1], [0.2], [0.3]]))
        m.item_bias.weight.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
        m.bias.fill_(10.0)
    # user 1 = (0.5, -1), bias 0.2: item 2 = (2, 2), bias 3 -> 1 - 2 + 0.2 + 3 + 10 = 12.2
    assert m(torch.tensor([1]), torch.tensor([[2]])).item() == pytest.approx(12.2)
    full = m(torch.tensor([0, 1]))
    assert full[0].tolist() == pytest.approx([1 + 0.1 + 1 + 10, 2 + 0.1 + 2 + 10, 6 + 0.1 + 3 + 10, 1 + 0.1 + 4 + 10])
    assert full[1, 2].item() == pytest.approx(12.2)


@pytest.mark.parametrize("name", ["mf", "two_tower", "ncf"])
def test_candidate_scores_equal_full_scores_and_every_parameter_learns(name):
    torch.manual_seed(0)
    m = create_model(name, n_users=5, n_items=7)
    users = torch.tensor([0, 3, 4])
    items = torch.tensor([[0, 6, 2], [1, 1, 5], [3, 4, 0]])
    full = m(users)
    assert full.shape == (3, 7)
    assert torch.allclose(m(users, items), full.gather(1, items), atol=1e-5)
    shared = items[0][None, :].expand(3, -1)  # in-batch candidates: one row, stride 0 (a shortcut for dot models)
    assert torch.allclose(m(users, shared), full[:, items[0]], atol=1e-5)
    m(users, items).sum().backward()
    # the sampled rows and their embedding rows get gradients; so does every dense parameter
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_two_tower_is_cosine_over_temperature():
    m = create_model("two_tower", n_users=3, n_items=4, tower=(8, 4), temperature=0.5)
    u, v = m.user_vectors(torch.tensor([2])), m.item_vectors(torch.tensor([1]))
    ref = torch.nn.functional.cosine_similarity(m.user_tower(m.user.weight[2:3]), m.item_tower(m.item.weight[1:2]))
    assert (u @ v.t()).item() == pytest.approx(ref.item(), abs=1e-6)
    assert m(torch.tensor([2]), torch.tensor([[1]])).item() == pytest.approx(ref.item() / 0.5, abs=1e-5)


def test_neumf_split_first_layer_equals_the_concatenated_layer():
    torch.manual_seed(0)
    m = create_model("ncf", n_users=4, n_items=5, gmf_dim=3, mlp=(8, 6, 4))
    u, i = torch.tensor([1, 3]), torch.tensor([[2], [4]])
    w = torch.cat([m.first_user.weight, m.first_item.weight], 1)  # the paper's W over [p'_u; q'_i]
    h = torch.relu(torch.cat([m.mlp_user(u), m.mlp_item(i[:, 0])], 1) @ w.t() + m.first_user.bias)
    h = m.mlp_rest(h)
    gmf = m.gmf_user(u) * m.gmf_item(i[:, 0])
    ref = m.predict(torch.cat([gmf, h], 1)).squeeze(-1)
    assert torch.allclose(m(u, i)[:, 0], ref, atol=1e-6)


def test_popularity_and_item_knn_by_hand():
    # users x items:  u0: i0 i1    u1: i0 i1 i2    u2: i2 i3
    users, items = torch.tensor([0, 0, 1, 1, 1, 2, 2]), torch.tensor([0, 1, 0, 1, 2, 2, 3])
    pop = Popularity.fit(users, items, 3, 4)
    assert pop(torch.tensor([0])).tolist() == [[2.0, 2.0, 2.0, 1.0]]
    knn = ItemKNN.fit(users, items, 3, 4, k=None)
    # cosine: sim(0,1) = 2/sqrt(2*2) = 1, sim(0,2) = 1/sqrt(2*2) = .5, sim(1,2) = .5, sim(2,3) = 1/sqrt(2*1),
    # sim(0,3) = sim(1,3) = 0; user 2 has i2, i3: score(j) = sim(2, j) + sim(3, j)
    s = knn(torch.tensor([2, 0]))
    r = 1 / math.sqrt(2)
    assert s[0].tolist() == pytest.approx([0.5, 0.5, r, r])
    assert s[1].tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])  # user 0 has i0, i1
    # k = 1: each item keeps its single most similar item (ties: lowest index); i2's is i3 (0.707 > 0.5)
    knn1 = ItemKNN.fit(users, items, 3, 4, k=1)
    assert knn1(torch.tensor([2]))[0].tolist() == pytest.approx([0.0, 0.0, r, r])


# ----- losses -------------------------------------------------------------------------------------------------
def test_losses_by_hand():
    s = torch.tensor([[2.0, 1.0, -1.0], [0.0, 0.5, 0.0]])  # column 0: the positive
    batch = {"item": torch.tensor([0, 1])}
    bpr = RecommendationTask(2, 3, loss="bpr", negatives=2).loss(RecOutput(s, "sampled"), batch)
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert bpr.item() == pytest.approx(-(math.log(sig(1)) + math.log(sig(3)) + math.log(sig(-0.5))
                                         + math.log(sig(0))) / 4)
    bce = RecommendationTask(2, 3, loss="bce", negatives=2).loss(RecOutput(s, "sampled"), batch)
    sp = lambda x: math.log1p(math.exp(x))
    assert bce.item() == pytest.approx((sp(-2) + sp(1) + sp(-1) + sp(0) + sp(0.5) + sp(0)) / 6)
    # in-batch: rows 0 and 2 share item 5, so row 2's positive is not a negative of row 0 (and vice versa);
    # logQ: q(5) = 2/4, q(7) = 1/4, q(9) = 1/4 (training frequencies set by the task)
    task = RecommendationTask(3, 10, loss="in_batch")
    task.log_q = torch.log(torch.tensor([1, 1, 1, 1, 1, 2, 1, 1, 1, 1.0]) / 4)
    s = torch.tensor([[1.0, 0.0, 3.0], [0.5, 2.0, 0.0], [0.0, 1.0, 1.0]])
    got = task.loss(RecOutput(s, "in_batch"), {"item": torch.tensor([5, 7, 5])})
    lq = [math.log(0.5), math.log(0.25), math.log(0.5)]
    rows = []
    for i in range(3):
        logits = [s[i, j].item() - lq[j] for j in range(3) if j == i or not (i != j and {i, j} == {0, 2})]
        pos = s[i, i].item() - lq[i]
        rows.append(-pos + math.log(sum(math.exp(v) for v in logits)))
    assert got.item() == pytest.approx(sum(rows) / 3, rel=1e-5)


def test_task_and_model_options_are_checked():
    with pytest.raises(ConfigError, match="task.loss: expected one of bpr, bce, softmax, in_batch"):
        RecommendationTask(3, 4, loss="warp")
    with pytest.raises(ConfigError, match="task.negatives"):
        RecommendationTask(3, 4, loss="bpr", negatives=0)
    with pytest.raises(ConfigError, match="task.ks"):
        RecommendationTask(3, 4, ks=[0])
    with pytest.raises(ModelError, match="ncf: mlp"):
        create_model("ncf", mlp=(7, 4))
    with pytest.raises(ModelError, match=r"mf: item ids must be in \[0, 4\)"):
        create_model("mf", n_users=2, n_items=4)(torch.tensor([0]), torch.tensor([[4]]))


# ----- bad files: one line, exit 2 ---------------------------------------------------------------------------
BAD = {
    "unknown column": ("user_id,item_id,timestamp\n1,a,1\n1,b,2\n1,c,3\n", ["data.user_col=uid"],
                       "data error: data.user_col: column 'uid' not found"),
    "duplicate header": ("user_id,item_id,item_id\n1,a,1\n", [], "column 'item_id' appears twice in the header"),
    "one interaction": ("user_id,item_id,timestamp\n1,a,1\n1,b,2\n1,c,3\n2,a,4\n", [],
                        "user '2' has 1 distinct interaction(s)"),
    "NaN id": ("user_id,item_id,timestamp\n1,a,1\nNaN,b,2\n1,c,3\n", [],
               "id 'NaN' in column 'user_id' is a missing value"),
    "empty id": ("user_id,item_id,timestamp\n1,a,1\n,b,2\n1,c,3\n", [], "data row 2: empty id in column 'user_id'"),
    "empty file": ("", [], "empty file; expected a header row"),
    "bad time": ("user_id,item_id,timestamp\n1,a,1\n1,b,yesterday-ish\n1,c,3\n", [],
                 "'yesterday-ish' in time column 'timestamp' is neither a number nor a date"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_interaction_files_are_one_line_exit_2(case, tmp_path, capsys):
    text, extra, expected = BAD[case]
    f = write(tmp_path / "bad.csv", text)
    rc = main(["train", str(CONFIG), f"data.path={f}", "data.items_path=null", f"logging.root={tmp_path}",
               "trainer.progress=false", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err, err
    assert expected in err


def test_gzip_and_dates_are_read(tmp_path):
    f = tmp_path / "i.csv.gz"
    with gzip.open(f, "wt") as g:
        g.write("u\ti\twhen\n")  # a .csv name with tabs would not parse: name it .tsv
    f = tmp_path / "i.tsv.gz"
    with gzip.open(f, "wt") as g:
        g.write("u\ti\twhen\nx\tm1\t2020-01-03\nx\tm2\t2020-01-01\nx\tm3\t2020-01-02\n")
    b = interactions(path=f, user_col="u", item_col="i", time_col="when")
    items = list(b.extras["item_ids"])
    assert [items[i] for i in (b.train.tensors["item"][0], b.val.tensors["item"][0], b.test.tensors["item"][0])] \
        == ["m2", "m3", "m1"]


def test_min_user_interactions_drops_short_users(tmp_path):
    f = write(tmp_path / "i.csv", "user_id,item_id\n1,a\n1,b\n1,c\n2,a\n")
    b = interactions(path=f, time_col=None, min_user_interactions=3)
    assert b.meta["n_users"] == 1 and b.meta["users_dropped"] == 1
    with pytest.raises(ConfigError, match="data.min_user_interactions"):
        interactions(path=f, time_col=None, min_user_interactions=2)


# ----- end to end -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, loss", [("mf", ["task.loss=bpr"]), ("two_tower", ["task.loss=in_batch"]),
                                         ("ncf", ["task.loss=bce", "task.negatives=4"])])
def test_every_recommender_learns_planted_groups(model, loss, tmp_path):
    """200 users in 4 groups, each with 6 of its group's 10 items in random order: after 4 training items and 1
    validation item are left out, the test item is one of 5 unseen items of the user's group (of 35 unseen in
    all), so recall@5 is 1 for a model that learned the groups; popularity (flat here) gets about 5/35."""
    g = torch.Generator().manual_seed(0)
    rows = ["user_id,item_id,timestamp"]
    for u in range(200):
        for t, i in enumerate((torch.randperm(10, generator=g)[:6] + 10 * (u % 4)).tolist()):
            rows.append(f"u{u},i{i},{t}")
    f = write(tmp_path / "groups.csv", "\n".join(rows) + "\n")
    assert main(["train", str(CONFIG), f"data.path={f}", "data.items_path=null", "data.batch_size=64",
                 "task.ks=[5]", "trainer.monitor=val/ndcg@5", f"model.name={model}", *loss, "trainer.threads=1",
                 "trainer.progress=false", "logging.tensorboard=false", "logging.plots=false", "cost.energy=false",
                 "cost.flops=false", f"logging.root={tmp_path}", "name=groups"]) == 0
    s = json.loads((tmp_path / "groups" / "summary.json").read_text())["test"]
    assert s["test/recall@5"] >= 0.9 and s["test/popularity_recall@5"] <= 0.2, s


@pytest.fixture(scope="module")
def mf_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recsys")
    rc = main(["train", str(CONFIG), "trainer.threads=1", "trainer.progress=false",
               "logging.tensorboard=false", "logging.plots=false", "cost.energy=false", "cost.flops=false",
               f"logging.root={root}", "name=mt"])
    assert rc == 0
    return root / "mt"


def test_lamina_train_beats_popularity(mf_run):
    s = json.loads((mf_run / "summary.json").read_text())["test"]
    # popularity on this split: recall@10 0.146, ndcg@10 0.074 (the task reports it beside every run)
    assert s["test/popularity_recall@10"] == pytest.approx(0.1461, abs=1e-3)
    assert s["test/recall@10"] > s["test/popularity_recall@10"] + 0.01, s
    assert s["test/ndcg@10"] > s["test/popularity_ndcg@10"], s


def test_lamina_recommend_prints_new_titles(mf_run, capsys):
    assert main(["recommend", str(mf_run), "8", "--k", "5", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["user"] == "8" and len(r["items"]) == 5 and all(x["title"] for x in r["items"])
    b = interactions()
    u = list(b.extras["user_ids"]).index("8")
    mine = {b.extras["item_ids"][i] for d in (b.train, b.val, b.test)
            for i in d.tensors["item"][d.tensors["user"] == u].tolist()}
    assert not mine & {x["item"] for x in r["items"]}  # nothing the user already has
    assert [x["score"] for x in r["items"]] == sorted((x["score"] for x in r["items"]), reverse=True)
    assert main(["recommend", str(mf_run), "8", "--k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("user 8 (mf); latest:") and len(out) == 4 and out[1].lstrip().startswith("1.")
    assert main(["recommend", str(mf_run), "no-such-user"]) == 2
    assert "user 'no-such-user' is not in the run's data" in capsys.readouterr().err


def test_evaluate_ranking_agrees_with_the_run(mf_run):
    from lamina.runs import open_run

    run = open_run(mf_run)
    b = run.data()
    m = evaluate_ranking(run.model, run.task, b, "test")
    s = json.loads((mf_run / "summary.json").read_text())["test"]
    assert m["recall@10"] == pytest.approx(s["test/recall@10"], abs=1e-9)
    assert isinstance(run.task, RecommendationTask)
    with pytest.raises(DataError):
        run.split("nope")
