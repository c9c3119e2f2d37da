"""Out-of-distribution row of docs/RESULTS.md: probes trained on Jigsaw comments, evaluated on ToxicChat prompts.

Both stores are SmolLM2-135M (bf16) with the same prompt format (the chat template, first 128 tokens), which
`probecache eval` requires. ToxicChat is extracted with exactly the arguments of bench/results.py, so its test
split is the one the in-distribution ToxicChat table was measured on. Each probe row is one `probecache train`
on the Jigsaw store (grid x 3 seeds, selected on a validation carve of Jigsaw's train split, decision threshold
tuned there), then `probecache eval --store <toxicchat> --split test` of the saved model: the seed that won on
Jigsaw validation, i.e. the model a user would ship. No ToxicChat example is seen before that evaluation.

    python bench/ood.py --data-dir ../shared/data                        # prints the table
    python bench/ood.py --data-dir ../shared/data --write docs/RESULTS.md  # and (re)writes its section there

Resumable like bench/results.py: trained runs and their OOD metrics are recorded in <out>/index.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from results import CLI, REPO, datasets, probe_rows, run

SECTION = "## Out of distribution: trained on Jigsaw, tested on ToxicChat"
ROWS = ("pooling", "scoring", "mha/32", "linear", "muli", "tfidf")  # mha/8: ~4x the CPU time of mha/32


def jigsaw_args(data_dir: Path, limit: int) -> list[str]:
    return ["--dataset", "jigsaw", "--data-dir", str(data_dir), "--limit", str(limit), "--prompt-format", "chat",
            "--max-tokens", "128"]


def saved_seed_test(run_dir: Path) -> dict:
    """In-distribution (Jigsaw) test metrics of the saved seed; baselines have one deterministic fit."""
    config = json.loads((run_dir / "config.json").read_text())
    seeds = json.loads((run_dir / "metrics.json").read_text())["seeds"]
    saved = config.get("saved_seed", seeds[0]["seed"])
    return next(s["test"] for s in seeds if s["seed"] == saved)


def in_distribution(results_index: Path) -> dict[str, dict]:
    """ToxicChat-trained test metrics from bench/results.py's runs, where they are still on disk."""
    if not results_index.is_file():
        return {}
    runs = json.loads(results_index.read_text()).get("toxicchat", {})
    return {label: json.loads((Path(d) / "metrics.json").read_text())["test"]
            for label, d in runs.items() if (Path(d) / "metrics.json").is_file()}


def pct(metrics: dict | None, key: str) -> str:
    return "—" if not metrics or metrics.get(key) is None else f"{100 * metrics[key]:.1f}"


def precision_recall(metrics: dict) -> tuple[str, str]:
    """From the binary confusion matrix (rows = true class): precision and recall of the toxic class."""
    (_, fp), (fn, tp) = metrics["confusion"]
    return (f"{100 * tp / (tp + fp):.1f}" if tp + fp else "—"), (f"{100 * tp / (tp + fn):.1f}" if tp + fn else "—")


def dec(metrics: dict | None, key: str) -> str:
    return "—" if not metrics or metrics.get(key) is None else f"{metrics[key]:.3f}"


def markdown(index: dict, reference: dict[str, dict], jigsaw_about: str) -> str:
    lines = [SECTION, "",
             f"Produced by `python bench/ood.py --data-dir ../shared/data --write docs/RESULTS.md`. Train: "
             f"{jigsaw_about}. Test: the ToxicChat test carve of the table above (280 prompts, 38 toxic). Both "
             "stores use the chat template and the first 128 tokens. One model per row: the seed selected on "
             "Jigsaw validation, at the threshold tuned there; no ToxicChat example was seen before the test.", "",
             "| probe | Jigsaw test F1 | ToxicChat test F1 | ToxicChat AUROC | ToxicChat AUPRC | precision | recall |"
             " trained on ToxicChat (saved seed): F1 / AUPRC |",
             "|---|---|---|---|---|---|---|---|"]
    for label in ROWS:
        row = index.get(label)
        if not row or "ood" not in row:
            continue
        own, ood, ref = row["in_distribution"], row["ood"], reference.get(label)
        ref_cell = f"{pct(ref, 'f1')} / {dec(ref, 'auprc')}" if ref else "see the ToxicChat table"
        lines.append(f"| {label} | {pct(own, 'f1')} | {pct(ood, 'f1')} | {dec(ood, 'auroc')} | "
                     f"{dec(ood, 'auprc')} | {' | '.join(precision_recall(ood))} | {ref_cell} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace this script's section of ``path`` (or append it), leaving every other line as it is."""
    old = path.read_text() if path.exists() else ""
    if SECTION in old:
        start = old.index(SECTION)
        nxt = old.find("\n## ", start + len(SECTION))
        old = old[:start].rstrip("\n") + ("\n\n" + old[nxt + 1:] if nxt != -1 else "")
    path.write_text(old.rstrip("\n") + "\n\n" + text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=3000, help="Jigsaw examples (train + test) [default: 3000]")
    parser.add_argument("--root", default=str(REPO / "bench" / "out" / "stores"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "ood")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    parser.add_argument("--write", type=Path, default=None, help="(re)write this script's section of this file")
    args = parser.parse_args()
    toxicchat = datasets(args.data_dir).get("toxicchat")
    jigsaw_csv = args.data_dir / "jigsaw_toxic" / "jigsaw2018_multilabel_train.csv"
    if toxicchat is None or not jigsaw_csv.is_file():
        sys.exit(f"skip: needs {args.data_dir}/toxicchat and {jigsaw_csv}")
    args.out.mkdir(parents=True, exist_ok=True)
    index_path = args.out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}

    stores: dict[str, str] = {}

    def store(name: str) -> str:
        """Extracted on first use: a finished index only re-renders the table."""
        if name not in stores:
            extract = [*CLI, "extract", "--logits", "--store-text", "--root", args.root]
            spec = toxicchat["args"] if name == "toxicchat" else jigsaw_args(args.data_dir, args.limit)
            stores[name] = run([*extract, *spec]).removeprefix("store: ")
        return stores[name]

    for label, probe_args in probe_rows(args.quick):
        if label not in ROWS:
            continue
        row = index.setdefault(label, {})
        if not (row.get("run") and (Path(row["run"]) / "metrics.json").exists()):
            line = run([*CLI, "train", "--store", store("jigsaw"), *probe_args, "--metric", "f1",
                        "--runs-dir", str(args.out / "runs")])
            row.clear()
            row["run"] = line.removeprefix("run: ")
        row["in_distribution"] = saved_seed_test(Path(row["run"]))
        if "ood" not in row:
            row["ood"] = json.loads(run([*CLI, "eval", "--run", row["run"], "--store", store("toxicchat"),
                                         "--split", "test", "--json"]))
        index_path.write_text(json.dumps(index, indent=2))
    about = (f"Jigsaw toxic comments (shared subset, toxic-enriched: 37.9 % toxic), {args.limit:,} sampled, "
             "validation carved from train")
    text = markdown(index, in_distribution(REPO / "bench" / "out" / "results" / "index.json"), about)
    print(text)
    if args.write:
        write_section(args.write, text)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
