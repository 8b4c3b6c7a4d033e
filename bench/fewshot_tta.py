"""Test-time augmentation on the few-shot benchmark's models: the same model evaluated with and without it.

    python bench/fewshot.py --variants fls0.3,elastic34 --sets mnist30 --seeds 42 --keep-models /tmp/models
    python bench/fewshot_tta.py --models /tmp/models --out bench/results/fewshot_tta.json

Every ``<set>-<setting>-s<seed>.pth`` in --models (what ``fewshot.py --keep-models`` copies) is
evaluated by the real command (scripts/evaluate.py, in a subprocess) on its set's test images, once
plainly (``--no-tta``) and once with ``--tta``. The sets are rebuilt as fewshot.py builds them (the same draw, so the
accuracy with the model file's own views, TTA for runs with ``tta`` on (``auto`` on new scripts), plain with it off (``auto`` on digits),
equals the one the training run reported). Reported per set and setting: the mean ± sd
over seeds of both accuracies and of their difference (points). Models already in --out are skipped, so
a second call with more models adds to the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import fewshot  # noqa: E402  (the benchmark's set builders)

EVALUATE = ROOT.parent / "scripts" / "evaluate.py"


def evaluate(model: Path, data: Path, out: Path, tta: bool, cache: Path, threads: int) -> float:
    """Test accuracy of ``model`` on ``data`` through the real evaluate command."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CNN_FINETUNE_CACHE=str(cache))
    args = [sys.executable, str(EVALUATE), "--model", str(model), "--data", str(data), "--output-dir", str(out),
            "--device", "cpu"] + (["--tta"] if tta else ["--no-tta"])
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"evaluating {model} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return float(json.loads((out / "evaluation.json").read_text())["accuracy"])


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per set and setting: mean and sd (over seeds) of the plain and TTA accuracy and their difference, in %."""
    table: dict[str, dict[str, Any]] = {}
    for r in rows:
        table.setdefault(r["set"], {}).setdefault(r["variant"], []).append(r)
    for cells in table.values():
        for variant, group in cells.items():
            def stat(key: str) -> tuple[float, float]:
                v = np.array([100 * g[key] for g in group])
                return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
            diff = np.array([100 * (g["tta_acc"] - g["plain_acc"]) for g in group])
            cells[variant] = {"plain": stat("plain_acc"), "tta": stat("tta_acc"), "n": len(group),
                              "gain": (float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0),
                              "seeds": sorted(g["seed"] for g in group)}
    return table


def markdown(table: dict[str, dict[str, Any]]) -> str:
    """One row per set and setting: plain, with TTA, and the gain (mean ± sd over seeds)."""
    lines = ["| set | setting | plain | with TTA | TTA gain (points) |", "|---|---|---|---|---|"]
    for set_name, cells in table.items():
        for variant, c in cells.items():
            lines.append(f"| {set_name} | {variant} | {c['plain'][0]:.2f} ± {c['plain'][1]:.2f} | {c['tta'][0]:.2f} ± "
                         f"{c['tta'][1]:.2f} | {c['gain'][0]:+.2f} ± {c['gain'][1]:.2f} (n={c['n']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Evaluate every kept model with and without TTA; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, required=True, help="folder of <set>-<setting>-s<seed>.pth (fewshot.py --keep-models)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "fewshot_tta.json")
    p.add_argument("--test-per-class", type=int, default=300, help="as fewshot.py's (default 300)")
    p.add_argument("--qmnist-test-per-class", type=int, default=170, help="as fewshot.py's (default 170)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    models = sorted(args.models.glob("*.pth"))
    if not models:
        raise SystemExit(f"no .pth files in {args.models}; run bench/fewshot.py --variants ... --keep-models {args.models}")
    # Models already in --out are not evaluated again: a long evaluation can be cut short and continued.
    rows = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    have = {f"{r['set']}-{r['variant']}-s{r['seed']}" for r in rows}
    models = [m for m in models if m.stem not in have]
    print(f"{len(models)} models to evaluate ({len(have)} already in {args.out})", flush=True)
    with tempfile.TemporaryDirectory(prefix="tta-") as tmp:
        work, built = Path(tmp), {}
        for model in models:
            set_name, rest = next((s, model.stem[len(s) + 1:]) for s in sorted(fewshot.SETS, key=len, reverse=True)
                                  if model.stem.startswith(s + "-"))
            variant, seed = rest.rsplit("-s", 1)
            if set_name not in built:
                per_test = args.qmnist_test_per_class if fewshot.SETS[set_name][0] in fewshot.QMNIST_KINDS else args.test_per_class
                built[set_name] = fewshot.build_set(set_name, work / "data" / set_name, per_test)[1]
            accs = [evaluate(model, built[set_name], work / "eval" / model.stem / str(tta), tta, work / "cache", args.threads)
                    for tta in (False, True)]
            rows.append({"set": set_name, "variant": variant, "seed": int(seed), "plain_acc": accs[0], "tta_acc": accs[1]})
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"summary": summarize(rows), "runs": rows}, indent=2) + "\n")
            print(f"  {model.stem}: plain {100 * accs[0]:.2f}%, TTA {100 * accs[1]:.2f}%", flush=True)
    table = summarize(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": table, "runs": rows}, indent=2) + "\n")
    print("\n" + markdown(table) + f"\n\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
