"""Time and peak memory of one forward and backward pass of `losses.SupConLoss` on the CPU.

The script compares the loss with a dense-mask version of the same equation written below (float
masks over the whole batch, built the way the original SupContrast reference code builds them)
and, when installed, pytorch-metric-learning's `SupConLoss` and lightly's `NTXentLoss`
(`requirements-bench.txt`).
Inputs: B samples with V = 2 views of D = 128 float32 features, one process, with
temperature = base_temperature, where all of them compute the same loss. The SimCLR table uses no
labels; the SupCon table uses 10 classes and leaves out lightly, which takes no labels.

Time: median and min over the timed passes (--repeats at B = 4096, 2x as many at 1024 and 8x at
256) after two warm-up passes. The methods take turns in this process, so that load from other
processes spreads over all of them alike. On a machine shared with other jobs, `--threads 1`
gives steadier times, because with two threads a parallel op stalls while one of its threads
waits for a core.

Peak memory: each case runs in a fresh subprocess with glibc's mmap threshold pinned
(MALLOC_MMAP_THRESHOLD_), so every block of 128 KiB or more goes back to the OS when freed. After
one pass, the subprocess resets its resident-set high-water mark (`/proc/self/clear_refs`), runs
a second pass and reports VmHWM minus the VmRSS before it. That counts every page the pass
touches: autograd's saved tensors, temporaries and library workspaces. It needs Linux.

Run: `.venv/bin/python benchmarks/loss_bench.py`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from losses import SupConLoss  # noqa: E402

NUM_VIEWS = 2
FEATURE_DIM = 128
NUM_CLASSES = 10
TEMPERATURE = 0.1
BATCH_SIZES = (256, 1024, 4096)
MMAP_THRESHOLD_BYTES = 128 * 1024
WARMUP_ROUNDS = 2
# Losses of the libraries and of this package agree to this relative difference in float32.
VALUE_RTOL = 1e-4

METHODS = {
    "this loss": "ours",
    "dense-mask baseline": "dense",
    "pytorch-metric-learning SupConLoss": "pml",
    "lightly NTXentLoss": "lightly",
}


def dense_mask_loss(features: Tensor, labels: Tensor | None) -> Tensor:
    """Compute L_out with float masks over the whole batch, as the SupContrast reference does.

    Shapes: features (B, V, D), N = B*V rows in view-major order.
    """
    batch_size, num_views, _ = features.shape
    if labels is None:
        sample_mask = torch.eye(batch_size, dtype=features.dtype)  # (B, B)
    else:
        sample_mask = (labels[:, None] == labels[None, :]).to(features.dtype)  # (B, B)
    rows = torch.cat(torch.unbind(features, dim=1))  # (N, D)
    num_rows = rows.shape[0]

    logits = rows @ rows.T / TEMPERATURE  # (N, N)
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # (N, N)
    not_self = torch.scatter(
        torch.ones_like(logits), 1, torch.arange(num_rows).view(-1, 1), 0.0
    )  # (N, N)
    positive = sample_mask.repeat(num_views, num_views) * not_self  # (N, N)

    exp_logits = torch.exp(logits) * not_self  # (N, N)
    log_prob = logits - torch.log(exp_logits.sum(dim=1, keepdim=True))  # (N, N)
    mean_log_prob = (positive * log_prob).sum(dim=1) / positive.sum(dim=1)  # (N,)
    return -mean_log_prob.mean()


def make_step(method: str, features: Tensor, labels: Tensor | None) -> Callable[[], Tensor]:
    """Return a function that runs one forward pass of `method` and returns the scalar loss."""
    batch_size = features.shape[0]
    sample_ids = torch.arange(batch_size) if labels is None else labels  # (B,)

    if method == "ours":
        loss_fn = SupConLoss(temperature=TEMPERATURE, base_temperature=TEMPERATURE)
        return lambda: loss_fn(functional.normalize(features, dim=-1), labels).loss
    if method == "dense":
        return lambda: dense_mask_loss(functional.normalize(features, dim=-1), labels)
    if method == "pml":
        from pytorch_metric_learning.losses import SupConLoss as MetricLearningSupConLoss

        loss_fn = MetricLearningSupConLoss(temperature=TEMPERATURE)
        view_labels = sample_ids.repeat(NUM_VIEWS)  # (B*V,)
        # The library's cosine similarity normalises the embeddings itself.
        return lambda: loss_fn(torch.cat(torch.unbind(features, dim=1)), view_labels)
    if method == "lightly":
        if labels is not None:
            raise ValueError("lightly's NTXentLoss has no labels; run it on the SimCLR table only")
        from lightly.loss import NTXentLoss

        loss_fn = NTXentLoss(temperature=TEMPERATURE)
        return lambda: loss_fn(features[:, 0], features[:, 1])
    raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS.values())}")


def read_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def make_inputs(batch_size: int, supervised: bool) -> tuple[Tensor, Tensor | None]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch_size, NUM_VIEWS, FEATURE_DIM, generator=generator)  # (B, V, D)
    labels = torch.randint(NUM_CLASSES, (batch_size,), generator=generator) if supervised else None
    return features.requires_grad_(), labels


def make_pass(method: str, features: Tensor, labels: Tensor | None) -> Callable[[], Tensor]:
    """Return a function that runs one forward and backward pass and returns the loss value."""
    step = make_step(method, features, labels)

    def forward_backward() -> Tensor:
        features.grad = None
        loss = step()
        loss.backward()
        return loss.detach()

    return forward_backward


def measure_memory_here(method: str, batch_size: int, supervised: bool) -> dict[str, float]:
    """Return the peak resident memory that one pass adds, in MiB, and the loss value."""
    features, labels = make_inputs(batch_size, supervised)
    forward_backward = make_pass(method, features, labels)
    value = forward_backward()

    rss_before_kib = read_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    forward_backward()
    peak_mib = (read_status_kib("VmHWM") - rss_before_kib) / 1024
    return {"peak_mib": peak_mib, "value": float(value)}


def measure_memory(method: str, batch_size: int, supervised: bool) -> dict[str, float]:
    """Run `measure_memory_here` in a fresh subprocess with the mmap threshold pinned."""
    command = [sys.executable, __file__, "--memory-case", method, "--batch", str(batch_size)]
    command += ["--threads", str(torch.get_num_threads())]
    command += ["--supervised"] if supervised else []
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD_BYTES))
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout)


def measure_times(
    methods: list[str], batch_size: int, supervised: bool, repeats: int
) -> dict[str, tuple[float, float]]:
    """Return the median and min pass time of each method in ms, running the methods in turn.

    Taking turns spreads the load of other processes on the machine over all methods alike.
    """
    features, labels = make_inputs(batch_size, supervised)
    passes = {method: make_pass(method, features, labels) for method in methods}
    times: dict[str, list[float]] = {method: [] for method in methods}
    for round_index in range(WARMUP_ROUNDS + repeats):
        for method, forward_backward in passes.items():
            start = time.perf_counter()
            forward_backward()
            if round_index >= WARMUP_ROUNDS:
                times[method].append(time.perf_counter() - start)
    return {
        method: (1000 * statistics.median(samples), 1000 * min(samples))
        for method, samples in times.items()
    }


def library_available(method: str) -> bool:
    module = {"pml": "pytorch_metric_learning", "lightly": "lightly.loss"}.get(method)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def print_table(title: str, supervised: bool, repeats: int) -> None:
    names = {
        method: name
        for name, method in METHODS.items()
        if library_available(method) and not (supervised and method == "lightly")
    }
    print(f"\n### {title}\n")
    print(
        "| batch B (rows B*V) | method | time ms, median | time ms, min | peak MiB "
        "| loss value | agrees |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for batch_size in BATCH_SIZES:
        memory = {method: measure_memory(method, batch_size, supervised) for method in names}
        # Small batches take milliseconds, so they get more passes against timing noise.
        batch_repeats = repeats * max(1, BATCH_SIZES[-1] // batch_size // 2)
        times = measure_times(list(names), batch_size, supervised, batch_repeats)
        reference_value = memory["ours"]["value"]
        for method, name in names.items():
            value = memory[method]["value"]
            agrees = abs(value - reference_value) <= VALUE_RTOL * abs(reference_value)
            median_ms, min_ms = times[method]
            print(
                f"| {batch_size} ({batch_size * NUM_VIEWS}) | {name} | {median_ms:.1f} | "
                f"{min_ms:.1f} | {memory[method]['peak_mib']:.1f} | {value:.6f} | "
                f"{'yes' if agrees else 'NO'} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="timed passes per method at the largest batch; smaller batches run more",
    )
    parser.add_argument(
        "--threads", type=int, help="intra-op CPU threads (default: torch's, one per core)"
    )
    parser.add_argument("--memory-case", choices=list(METHODS.values()), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.memory_case is not None:
        print(json.dumps(measure_memory_here(args.memory_case, args.batch, args.supervised)))
        return

    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores, 1-minute load average at start "
        f"{os.getloadavg()[0]:.2f}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"float32, V={NUM_VIEWS}, D={FEATURE_DIM}, temperature = base_temperature = {TEMPERATURE}"
    )
    print_table("SimCLR (no labels)", supervised=False, repeats=args.repeats)
    print_table(f"SupCon ({NUM_CLASSES} classes)", supervised=True, repeats=args.repeats)


if __name__ == "__main__":
    main()
