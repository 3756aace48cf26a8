"""Multi-process tests of `losses.SupConLoss` and the `distributed` helpers on gloo (CPU).

For each world size, one `torch.multiprocessing.spawn` call starts the ranks, which run every case
of that size and save their results. The tests then compare each rank's results with one process
on the concatenated batch. DDP averages gradients over ranks, so the mean of the rank losses must
match the single-process loss, and each rank's feature gradient divided by W its gradient.
"""

import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.nn import functional

import distributed
from losses import SupConLoss

DIM = 6
# float64 features keep the loss in float64, so only summation order separates the runs.
FLOAT64_TOLERANCE = {"rtol": 1e-10, "atol": 1e-10}
FLOAT32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
# Rows per rank in the helper tests, deliberately unequal.
HELPER_SIZES = {2: [3, 5], 3: [3, 5, 1]}
COLLECTIVE_TIMEOUT = timedelta(seconds=30)


@dataclass(frozen=True)
class Case:
    """One loss configuration run on `len(batch_sizes)` ranks."""

    batch_sizes: tuple[int, ...]
    num_views: int
    kind: str  # "labels", "mask", "simclr" or "unique_labels" (no positive anywhere)
    contrast_mode: str = "all"
    seed: int = 0
    dtype: torch.dtype = torch.float64
    labels: tuple[int, ...] | None = None  # fixed labels in place of random ones

    @property
    def world_size(self) -> int:
        return len(self.batch_sizes)


CASES = {
    "labels_equal": Case((4, 4), 2, "labels", seed=1),
    "labels_3_5": Case((3, 5), 2, "labels", seed=2),
    "simclr_3_5": Case((3, 5), 2, "simclr", seed=3),
    "simclr_float32": Case((4, 4), 2, "simclr", seed=4, dtype=torch.float32),
    "mask_3_5_three_views": Case((3, 5), 3, "mask", seed=5),
    "mode_one_5_3": Case((5, 3), 2, "labels", contrast_mode="one", seed=6),
    # One view: labels 0 and 1 pair samples on different ranks, and label 2 has no positive.
    "positives_across_ranks": Case((3, 2), 1, "labels", seed=7, labels=(0, 1, 2, 1, 0)),
    "no_positive_3_2": Case((3, 2), 1, "unique_labels", seed=8),
    "empty_rank_0_4": Case((0, 4), 2, "labels", seed=13),
    "labels_1_4_2": Case((1, 4, 2), 2, "labels", seed=9),
    "simclr_3_5_1_three_views": Case((3, 5, 1), 3, "simclr", seed=10),
    "mask_1_4_2_mode_one": Case((1, 4, 2), 2, "mask", contrast_mode="one", seed=11),
    "no_positive_1_4_2": Case((1, 4, 2), 1, "unique_labels", seed=12),
}
NO_POSITIVE_CASES = [name for name, case in CASES.items() if case.kind == "unique_labels"]
POSITIVE_CASES = [name for name in CASES if name not in NO_POSITIVE_CASES]


def global_inputs(case: Case) -> dict[str, Tensor | None]:
    """Build the concatenated batch of a case, the same in the test and in every rank."""
    generator = torch.Generator().manual_seed(case.seed)
    global_size = sum(case.batch_sizes)
    features = torch.randn(
        global_size, case.num_views, DIM, generator=generator, dtype=torch.float64
    )
    features = functional.normalize(features, dim=-1).to(case.dtype)  # (G, V, D)
    labels = mask = None
    if case.labels is not None:
        labels = torch.tensor(case.labels)
    elif case.kind == "labels":
        labels = torch.randint(3, (global_size,), generator=generator)  # (G,)
    elif case.kind == "unique_labels":
        labels = torch.arange(global_size)  # (G,)
    elif case.kind == "mask":
        mask = torch.rand(global_size, global_size, generator=generator) < 0.4  # (G, G)
    return {"features": features, "labels": labels, "mask": mask}


def rank_rows(case: Case, rank: int) -> slice:
    offset = sum(case.batch_sizes[:rank])
    return slice(offset, offset + case.batch_sizes[rank])


def loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    return names[0] if names else "lo"


def run_rank_cases(rank: int, world_size: int) -> dict[str, dict]:
    results = {}
    for name, case in CASES.items():
        if case.world_size != world_size:
            continue
        inputs = global_inputs(case)
        rows = rank_rows(case, rank)
        features = inputs["features"][rows].clone().requires_grad_()
        labels = None if inputs["labels"] is None else inputs["labels"][rows]
        mask = None if inputs["mask"] is None else inputs["mask"][rows]
        loss_fn = SupConLoss(
            temperature=0.1, base_temperature=0.07, contrast_mode=case.contrast_mode
        )

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = loss_fn(features, labels=labels, mask=mask)
        output.loss.backward()

        results[name] = {
            "loss": output.loss.detach(),
            "value": output.value,
            "grad": features.grad,
            "warned": any(issubclass(w.category, RuntimeWarning) for w in caught),
        }
    return results


def run_rank_helpers(rank: int, world_size: int) -> dict[str, object]:
    sizes = HELPER_SIZES[world_size]
    rows = sizes[rank]
    local = (100.0 * rank + torch.arange(rows * 2, dtype=torch.float64)).reshape(rows, 2)
    local.requires_grad_()

    gathered, offset = distributed.all_gather_with_grad(local)
    # Rank r weights global row j by (r + 1) * (j + 1), so the expected gradient is known.
    row_weights = (rank + 1) * torch.arange(1, gathered.shape[0] + 1, dtype=torch.float64)
    (gathered * row_weights[:, None]).sum().backward()

    local_labels = torch.arange(rows, dtype=torch.long) + 10 * rank
    return {
        "world_size": distributed.world_size(),
        "rank": distributed.rank(),
        "gathered": gathered.detach(),
        "offset": offset,
        "gather_grad": local.grad,
        "gathered_labels": distributed.all_gather_variable(local_labels),
        "reduced": distributed.all_reduce_sum(torch.tensor([rank + 1.0, 2.0])),
    }


def rank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Run every case and helper check of `world_size` on one rank and save the results."""
    os.environ["GLOO_SOCKET_IFNAME"] = loopback_interface()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        results = {"cases": run_rank_cases(rank, world_size)}
        results["helpers"] = run_rank_helpers(rank, world_size)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory):
    """Return a function that spawns a world size once and returns each rank's results."""
    cache: dict[int, list[dict]] = {}

    def load(world_size: int) -> list[dict]:
        if world_size not in cache:
            out_dir = tmp_path_factory.mktemp(f"world{world_size}")
            init_file = out_dir / "init"
            mp.spawn(
                rank_worker, args=(world_size, str(init_file), str(out_dir)), nprocs=world_size
            )
            cache[world_size] = [
                torch.load(out_dir / f"rank{rank}.pt", weights_only=False)
                for rank in range(world_size)
            ]
        return cache[world_size]

    return load


def single_process(case: Case) -> tuple[Tensor, Tensor]:
    """Return the loss and feature gradient of one process on the concatenated batch."""
    inputs = global_inputs(case)
    features = inputs["features"].clone().requires_grad_()
    loss_fn = SupConLoss(temperature=0.1, base_temperature=0.07, contrast_mode=case.contrast_mode)
    output = loss_fn(features, labels=inputs["labels"], mask=inputs["mask"])
    output.loss.backward()
    return output.value, features.grad


@pytest.mark.parametrize("name", POSITIVE_CASES)
def test_supcon_distributed_loss_matches_one_process(rank_results, name: str) -> None:
    case = CASES[name]
    ranks = rank_results(case.world_size)
    tolerance = FLOAT64_TOLERANCE if case.dtype == torch.float64 else FLOAT32_TOLERANCE

    expected, _ = single_process(case)

    mean_loss = torch.stack(
        [ranks[r]["cases"][name]["loss"] for r in range(case.world_size)]
    ).mean()
    torch.testing.assert_close(mean_loss, expected, **tolerance)
    for rank in range(case.world_size):
        torch.testing.assert_close(ranks[rank]["cases"][name]["value"], expected, **tolerance)


@pytest.mark.parametrize("name", POSITIVE_CASES)
def test_supcon_distributed_grad_matches_one_process(rank_results, name: str) -> None:
    case = CASES[name]
    ranks = rank_results(case.world_size)
    tolerance = FLOAT64_TOLERANCE if case.dtype == torch.float64 else FLOAT32_TOLERANCE

    _, expected_grad = single_process(case)

    for rank in range(case.world_size):
        # DDP divides the summed gradient by the world size.
        averaged_grad = ranks[rank]["cases"][name]["grad"] / case.world_size
        torch.testing.assert_close(averaged_grad, expected_grad[rank_rows(case, rank)], **tolerance)


@pytest.mark.parametrize("name", NO_POSITIVE_CASES)
def test_supcon_distributed_no_positive_zero(rank_results, name: str) -> None:
    case = CASES[name]
    ranks = rank_results(case.world_size)

    for rank in range(case.world_size):
        result = ranks[rank]["cases"][name]
        assert result["warned"], f"rank {rank} issued no warning"
        torch.testing.assert_close(result["loss"], torch.zeros((), dtype=case.dtype))
        torch.testing.assert_close(result["value"], torch.zeros((), dtype=case.dtype))
        torch.testing.assert_close(result["grad"], torch.zeros_like(result["grad"]), rtol=0, atol=0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_rank_and_world_size(rank_results, world_size: int) -> None:
    ranks = rank_results(world_size)

    assert [result["helpers"]["rank"] for result in ranks] == list(range(world_size))
    assert {result["helpers"]["world_size"] for result in ranks} == {world_size}


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_gather_with_grad_unequal_sizes(rank_results, world_size: int) -> None:
    sizes = HELPER_SIZES[world_size]
    ranks = rank_results(world_size)
    expected = torch.cat(
        [
            (100.0 * rank + torch.arange(size * 2, dtype=torch.float64)).reshape(size, 2)
            for rank, size in enumerate(sizes)
        ]
    )

    for rank, result in enumerate(ranks):
        helpers = result["helpers"]
        assert helpers["offset"] == sum(sizes[:rank])
        torch.testing.assert_close(helpers["gathered"], expected, rtol=0, atol=0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_gather_with_grad_sums_rank_grads(rank_results, world_size: int) -> None:
    sizes = HELPER_SIZES[world_size]
    ranks = rank_results(world_size)
    # Global row j receives (r + 1) * (j + 1) from each rank r, summed over ranks.
    rank_weight_sum = sum(range(1, world_size + 1))
    global_rows = torch.arange(1, sum(sizes) + 1, dtype=torch.float64)

    for rank, result in enumerate(ranks):
        offset = sum(sizes[:rank])
        row_grad = rank_weight_sum * global_rows[offset : offset + sizes[rank]]
        expected = row_grad[:, None].expand(sizes[rank], 2)
        torch.testing.assert_close(result["helpers"]["gather_grad"], expected, rtol=0, atol=0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_gather_variable_unequal_sizes(rank_results, world_size: int) -> None:
    sizes = HELPER_SIZES[world_size]
    ranks = rank_results(world_size)
    expected = torch.cat([torch.arange(size) + 10 * rank for rank, size in enumerate(sizes)])

    for result in ranks:
        gathered = result["helpers"]["gathered_labels"]
        assert gathered.dtype == torch.long
        torch.testing.assert_close(gathered, expected, rtol=0, atol=0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_reduce_sum_sums_ranks(rank_results, world_size: int) -> None:
    ranks = rank_results(world_size)
    expected = torch.tensor([sum(range(1, world_size + 1)), 2.0 * world_size])

    for result in ranks:
        torch.testing.assert_close(result["helpers"]["reduced"], expected, rtol=0, atol=0)


def test_distributed_helpers_one_process_fallback() -> None:
    assert not dist.is_initialized()
    local = torch.arange(6, dtype=torch.float64).reshape(3, 2).requires_grad_()

    gathered, offset = distributed.all_gather_with_grad(local)
    gathered.sum().backward()
    reduced = distributed.all_reduce_sum(local)
    gathered_variable = distributed.all_gather_variable(local)

    assert distributed.world_size() == 1
    assert distributed.rank() == 0
    assert offset == 0
    assert gathered is local
    torch.testing.assert_close(local.grad, torch.ones_like(local), rtol=0, atol=0)
    torch.testing.assert_close(reduced, local.detach(), rtol=0, atol=0)
    assert reduced.data_ptr() != local.data_ptr()
    assert not reduced.requires_grad
    assert not gathered_variable.requires_grad
