"""Partitioning prompts over clients: IID balance, Dirichlet skew over prompt groups, errors."""

from __future__ import annotations

import pytest

from firm.partition import PartitionError, describe_partitions, partition_prompts, split_evaluation
from firm.prompts import Prompt


def make_prompts(ordinary: int = 90, decline: int = 60) -> list[Prompt]:
    return [Prompt(messages=(("user", f"ordinary request {i}"),), category="ordinary/misc") for i in range(ordinary)] + [
        Prompt(messages=(("user", f"decline request {i}"),), category="decline/misc") for i in range(decline)
    ]


def assert_disjoint_cover(parts: list[list[Prompt]], prompts: list[Prompt]) -> None:
    flat = [p.messages for part in parts for p in part]
    assert len(flat) == len(set(flat)) == len(prompts)
    assert set(flat) == {p.messages for p in prompts}


def max_share_gap(parts: list[list[Prompt]], prompts: list[Prompt]) -> float:
    """Largest |decline share of a client - decline share overall|: how non-IID a split is."""
    global_share = sum(p.group == "decline" for p in prompts) / len(prompts)
    return max(abs(row["group_shares"]["decline"] - global_share) for row in describe_partitions(parts))


def test_iid_is_balanced_disjoint_and_covers_all():
    prompts = make_prompts()
    parts = partition_prompts(prompts, 4, scheme="iid", seed=0)
    sizes = [len(part) for part in parts]
    assert len(parts) == 4 and max(sizes) - min(sizes) <= 1
    assert_disjoint_cover(parts, prompts)


def test_iid_is_shuffled_not_contiguous():
    prompts = make_prompts()
    parts = partition_prompts(prompts, 2, scheme="iid", seed=0)
    assert {p.group for p in parts[0]} == {"ordinary", "decline"}


def test_dirichlet_small_alpha_skews_groups_more_than_iid():
    prompts = make_prompts()
    iid = partition_prompts(prompts, 4, scheme="iid", seed=0)
    skewed = partition_prompts(prompts, 4, scheme="dirichlet", alpha=0.1, seed=0)
    assert_disjoint_cover(skewed, prompts)
    assert all(len(part) >= 1 for part in skewed)
    assert max_share_gap(skewed, prompts) > max_share_gap(iid, prompts) + 0.2


def test_non_iid_is_an_alias_of_dirichlet():
    prompts = make_prompts()
    assert partition_prompts(prompts, 3, scheme="non-iid", seed=5) == partition_prompts(prompts, 3, scheme="dirichlet", seed=5)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitioning_is_deterministic_for_a_seed(scheme):
    prompts = make_prompts()
    first = partition_prompts(prompts, 3, scheme=scheme, seed=7)
    assert first == partition_prompts(prompts, 3, scheme=scheme, seed=7)
    assert first != partition_prompts(prompts, 3, scheme=scheme, seed=8)


def test_min_partition_size_is_respected():
    prompts = make_prompts()
    parts = partition_prompts(prompts, 3, scheme="dirichlet", alpha=1.0, seed=0, min_partition_size=20)
    assert min(len(part) for part in parts) >= 20


def test_describe_partitions_reports_sizes_and_shares():
    prompts = make_prompts(ordinary=3, decline=1)
    rows = describe_partitions([prompts[:2], prompts[2:], []])
    assert [row["size"] for row in rows] == [2, 2, 0]
    assert rows[0]["group_shares"] == {"decline": 0.0, "ordinary": 1.0}
    assert rows[1]["group_shares"] == {"decline": 0.5, "ordinary": 0.5}
    assert rows[2]["group_shares"] == {"decline": 0.0, "ordinary": 0.0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_partitions": 0}, "at least 1"),
        ({"num_partitions": 151}, "more partitions than prompts"),
        ({"num_partitions": 2, "scheme": "by-topic"}, "unknown partition scheme"),
        ({"num_partitions": 2, "alpha": 0.0}, "alpha must be > 0"),
        ({"num_partitions": 2, "scheme": "dirichlet", "alpha": -1.0}, "alpha must be > 0"),
        ({"num_partitions": 3, "min_partition_size": 60}, "min_partition_size"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        partition_prompts(make_prompts(), **kwargs)


def test_impossible_dirichlet_split_says_what_to_change():
    with pytest.raises(ValueError, match="raise alpha"):
        partition_prompts(make_prompts(), 40, scheme="dirichlet", alpha=0.05, seed=0)


def test_category_partition_gives_every_client_one_group_evenly():
    prompts = make_prompts(ordinary=90, decline=60)
    parts = partition_prompts(prompts, 4, scheme="category", seed=3)
    assert_disjoint_cover(parts, prompts)
    assert [{p.group for p in part} for part in parts] == [{"decline"}, {"ordinary"}, {"decline"}, {"ordinary"}]
    assert sorted(len(part) for part in parts) == [30, 30, 45, 45]
    assert partition_prompts(prompts, 4, scheme="category", seed=3) == parts
    with pytest.raises(PartitionError, match="needs at least 2 clients, got 1"):
        partition_prompts(prompts, 1, scheme="category")


def test_evaluation_split_is_disjoint_stable_and_independent_of_the_partition():
    prompts = make_prompts(ordinary=300, decline=200)
    train, evaluation = split_evaluation(prompts, 0.1)
    assert {p.messages for p in train}.isdisjoint({p.messages for p in evaluation})
    assert len(train) + len(evaluation) == len(prompts)
    assert 30 <= len(evaluation) <= 70  # a hash split: about 10 %
    assert split_evaluation(list(reversed(prompts)), 0.1)[1] == list(reversed(evaluation))  # order-free
    held_out = {p.messages for p in evaluation}
    for scheme in ("iid", "dirichlet", "category"):
        for seed in (0, 1):
            for part in partition_prompts(train, 4, scheme=scheme, seed=seed):
                assert held_out.isdisjoint(p.messages for p in part)
    assert split_evaluation(prompts, 0.0) == (prompts, [])
    with pytest.raises(PartitionError, match=r"eval_fraction must be in \[0, 1\)"):
        split_evaluation(prompts, 1.0)
