"""The estimator ablation on the tiny task suite (a small counterpart of the paper's
Table 2): coupled, decoupled, full_mask and d1, each over several seeds, all from one
shared warm-up, with held-out pass@1 and reward curves.

    python benchmarks/grpo_ablation.py --root=runs/ablation [--seeds 0,1,2] [--steps 120]
        [--json OUT]

Each run is `python -m dllm.main --config=experiments/coupled_grpo.py:<variant>` in
ROOT/<variant>/seed<k>, from ROOT/warmup (experiments/sft.py:tasks_tiny, trained first).
Rerunning the command resumes: finished runs are read, unfinished ones resume from
their last checkpoint. Writes ROOT/ablation.png (mean rollout reward, a moving average,
and held-out pass@1 against the step, mean over seeds) and prints the table: held-out
pass@1 at step 0 and at the end, mean and spread (min..max) over seeds. The 12 default
runs take about an hour on 2 CPU cores (61 min, 2026-11-28), plus the 27-min warm-up.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

VARIANTS = {"coupled": "tiny", "decoupled": "decoupled_tiny", "full_mask": "full_mask_tiny",
            "d1": "d1_tiny"}
SMOOTH = 10   # the reward curve is a moving average over this many rollouts
ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(config: str, workdir: str, *flags: str) -> None:
    """python -m dllm.main (resumes in an existing workdir; returns at once when done)."""
    os.makedirs(workdir, exist_ok=True)
    cmd = [sys.executable, "-m", "dllm.main", f"--config={config}", f"--workdir={workdir}",
           *flags]
    with open(os.path.join(workdir, "log.txt"), "a") as log:
        subprocess.run(cmd, cwd=ROOT_DIR, stdout=log, stderr=subprocess.STDOUT, check=True)


def read_rows(workdir: str) -> list[dict]:
    """metrics.jsonl, later rows of a step (a resumed run) replacing earlier ones."""
    rows: dict[int, dict] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            rows.setdefault(row["step"], {}).update(row)
    return [rows[s] for s in sorted(rows)]


def curves(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, per_seed in results.items():
        for ax, key in zip(axes, ("reward", "eval_pass_at_1")):
            series = [curves(rows, key) for rows in per_seed.values()]
            length = min(len(s[0]) for s in series)
            steps = series[0][0][:length]
            mean = np.mean([s[1][:length] for s in series], axis=0)
            if key == "reward":   # one value per rollout: its prompts' noise hides the trend
                window = min(SMOOTH, length)
                mean = np.convolve(mean, np.ones(window) / window, mode="valid")
                steps = steps[window - 1:]
            ax.plot(steps, mean, label=name)
    axes[0].set(xlabel="optimizer step", ylabel=f"mean rollout reward (last {SMOOTH} rollouts)",
                title="reward")
    axes[1].set(xlabel="optimizer step", ylabel="held-out pass@1", title="held-out pass@1")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval_every", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warm = os.path.join(args.root, "warmup")
    run("experiments/sft.py:tasks_tiny", warm)
    results: dict = {}
    for name, variant in VARIANTS.items():
        for seed in (int(s) for s in args.seeds.split(",")):
            workdir = os.path.join(args.root, name, f"seed{seed}")
            run(f"experiments/coupled_grpo.py:{variant}", workdir, f"--config.seed={seed}",
                f"--config.init.checkpoint={warm}", f"--config.train.steps={args.steps}",
                f"--config.train.eval_every={args.eval_every}")
            results.setdefault(name, {})[seed] = read_rows(workdir)
    table = {}
    print(f"held-out pass@1 ({args.steps} steps, seeds {args.seeds}; mean, min..max)")
    print("| estimator | step 0 | final | final - step 0 | final reward (last 4 rollouts) |")
    print("|---|---|---|---|---|")
    for name, per_seed in results.items():
        start = [curves(rows, "eval_pass_at_1")[1][0] for rows in per_seed.values()]
        end = [curves(rows, "eval_pass_at_1")[1][-1] for rows in per_seed.values()]
        reward = [np.mean(curves(rows, "reward")[1][-4:]) for rows in per_seed.values()]
        gain = np.subtract(end, start)
        table[name] = {"start": start, "final": end, "gain": gain.tolist(), "reward": reward}
        print(f"| {name} | {np.mean(start):.3f} | {np.mean(end):.3f} ({min(end):.3f}.."
              f"{max(end):.3f}) | {np.mean(gain):+.3f} ({min(gain):+.3f}..{max(gain):+.3f}) | "
              f"{np.mean(reward):.3f} |")
    plot(results, os.path.join(args.root, "ablation.png"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "seeds": args.seeds, "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
