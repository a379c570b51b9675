"""Two checkouts of cnn against each other in one run: training throughput and time to 99% on MNIST.

    git worktree add --detach ../before OLD_COMMIT
    python experiments/before_after.py --before=../before --after=. --data_dir=DIR

For a change that should not change speed (a refactoring), this is the check
that it did not: each round runs the Flax MNIST CNN's compiled step (each
checkout's own `experiments/benchmark.py`, cnn's part only) and then
`python -m cnn.main --config=configs/mnist.py` for one epoch, once per
checkout, alternating which goes first, every run in a fresh process with
that checkout first on PYTHONPATH. It prints each round and the medians of
the after/before ratios, which a drifting machine hits alike.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile


def images_per_second(checkout: str, blocks: int) -> float:
    """cnn's float32 step in `checkout`, as its own benchmark measures it (old or new command line)."""
    script = os.path.join(checkout, "experiments", "benchmark.py")
    env = {**os.environ, "PYTHONPATH": checkout}
    with open(script) as f:
        new = "throughput_worker" in f.read()
    if new:
        command = [sys.executable, script, "throughput_worker", "--variant=cnn float32", f"--blocks={blocks}"]
        out = subprocess.run(command, check=True, cwd=checkout, env=env, capture_output=True, text=True).stdout
        return statistics.median(json.loads(out.strip().splitlines()[-1])["blocks"])
    command = [sys.executable, script, "throughput", f"--blocks={blocks}"]
    out = subprocess.run(command, check=True, cwd=checkout, env=env, capture_output=True, text=True).stdout
    return float(re.search(r"cnn .*?:\s+([\d,]+) images/s", out).group(1).replace(",", ""))


def seconds_to_99(checkout: str, data_dir: str, workdir: str) -> float:
    """Seconds from process start to the end of the epoch that first reached 99.0% test accuracy."""
    command = [sys.executable, "-m", "cnn.main", "--config=configs/mnist.py", f"--workdir={workdir}",
               f"--config.data.data_dir={data_dir}", "--config.train.num_epochs=1"]
    env = {**os.environ, "PYTHONPATH": checkout}
    subprocess.run(command, check=True, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        history = [json.loads(line) for line in f]
    reached = [r["elapsed_seconds"] for r in history if r["test_accuracy"] >= 0.99]
    return reached[0] if reached else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the older checkout")
    parser.add_argument("--after", required=True, help="the newer checkout")
    parser.add_argument("--data_dir", required=True, help="where MNIST is prepared (TFDS data_dir)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=7, help="timed throughput blocks per process")
    args = parser.parse_args()
    checkouts = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    rows = {name: {"rate": [], "to99": []} for name in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = list(checkouts) if round_ % 2 == 0 else list(checkouts)[::-1]
            for name in order:
                rows[name]["rate"].append(images_per_second(checkouts[name], args.blocks))
            for name in order:
                rows[name]["to99"].append(seconds_to_99(checkouts[name], args.data_dir,
                                                        os.path.join(tmp, f"{name}{round_}")))
            print(f"round {round_ + 1}: " + "; ".join(
                f"{n} {rows[n]['rate'][-1]:,.0f} img/s, 99% at {rows[n]['to99'][-1]:.1f}s" for n in checkouts),
                flush=True)
    rate = statistics.median(a / b for a, b in zip(rows["after"]["rate"], rows["before"]["rate"]))
    to99 = statistics.median(a / b for a, b in zip(rows["after"]["to99"], rows["before"]["to99"]))
    print(f"after / before, median of {args.rounds} rounds: throughput {rate:.3f}x, time to 99.0% {to99:.3f}x")


if __name__ == "__main__":
    main()
