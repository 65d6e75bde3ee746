"""Cross-validation: train on every fold that preprocessing's --folds K wrote, score each fold's best model (chosen
on its valid part) on its test part, and report MAE, CA(3) and CA(5) as mean ± sd over the folds.

    python crossval.py --data_dir OUT --dataset NAME [--script train-ldl.py] [--checkpoint DIR]
                       [training flags and KEY VALUE ...]

A thin driver over the training script: each fold is one run of it (``--data_dir OUT/foldI --checkpoint
DIR/foldI`` and the flags and KEY VALUE pairs given here), which ends by scoring its best.pth on the fold's test CSV
(DIR/foldI/test/report.json). It resumes: a fold whose test report exists is not trained again, a fold stopped
half-way continues from its last.pth. DIR/crossval.json holds the per-fold figures, the mean and the sample
standard deviation (n - 1). See docs/protocols.md for the published protocols.
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from checkpoint import BEST_NAME, LAST_NAME, TEST_REPORT_DIR
from files import atomic_write
from preprocessing import split_record
from preprocessing.splits import FOLD_FOLDER

ROOT = Path(__file__).resolve().parent
SCRIPTS = ("train.py", "train-ldl.py", "train-mt.py")
DEFAULT_CHECKPOINT = "crossval"
RESULT_NAME = "crossval.json"
FIGURES = ("mae", "ca3", "ca5", "ca7")
SUMMARY_FIGURES = ("mae", "ca3", "ca5")
# flags of the training script that name what this driver sets for each fold
OWN_FLAGS = ("--data_dir", "--checkpoint", "--resume")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--data_dir", required=True, help="the folder preprocessing --folds K wrote (fold0 … inside)")
    parser.add_argument("--dataset", required=True, help="data set name, the CSVs' prefix")
    parser.add_argument("--script", choices=SCRIPTS, default="train.py",
                        help="the training script each fold runs (default: %(default)s)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help="folder for the folds' runs, fold0 … inside, and crossval.json (default: %(default)s)")
    return parser


def fold_dirs(data_dir, dataset):
    """The fold folders fold0 … fold{K-1}, K as fold0's split record says (or as many as there are in a row);
    SystemExit naming the missing file when a fold has no test CSV."""
    data_dir = Path(data_dir)
    first = data_dir / FOLD_FOLDER.format(0)
    record = split_record.check(first, dataset) if first.is_dir() else None
    count = (record or {}).get("folds")
    if count is None:
        count = 0
        while (data_dir / FOLD_FOLDER.format(count)).is_dir():
            count += 1
    if not count:
        raise SystemExit(f"{data_dir} has no {FOLD_FOLDER.format(0)} folder: write the folds with "
                         f"preprocessing/<name>.py --output_dir {data_dir} --folds K")
    folders = [data_dir / FOLD_FOLDER.format(fold) for fold in range(count)]
    for folder in folders:
        test = folder / split_record.csv_name(dataset, "test")
        if not test.is_file():
            raise SystemExit(f"{test} not found: every fold needs its test CSV; write the folds again with "
                             f"preprocessing/<name>.py --output_dir {data_dir} --folds {count}")
    return folders


def run_fold(fold, data_dir, run_dir, args, training_args):
    """Train one fold (or continue it), then make sure its best model is scored on test; returns its report."""
    report = run_dir / TEST_REPORT_DIR / "report.json"
    if report.is_file():
        print(f"fold {fold}: done before ({report}), not trained again", flush=True)
        return json.loads(report.read_text())
    command = [sys.executable, str(ROOT / args.script), "--data_dir", str(data_dir), "--dataset", args.dataset,
               "--checkpoint", str(run_dir), *training_args]
    if (run_dir / LAST_NAME).is_file():
        command += ["--resume", str(run_dir / LAST_NAME)]
    run(fold, command)
    if not report.is_file():  # a resumed run that had already finished its epochs scores nothing
        run(fold, [sys.executable, str(ROOT / "val.py"), "--data_dir", str(data_dir), "--dataset", args.dataset,
                   "--model", str(run_dir / BEST_NAME), "--split", "test", "--output_dir", str(report.parent)])
    return json.loads(report.read_text())


def run(fold, command):
    print(f"fold {fold}: {' '.join(command)}", flush=True)
    status = subprocess.run(command).returncode
    if status:
        raise SystemExit(f"fold {fold}: the command above failed (exit status {status}); fix it and run crossval.py "
                         "again: the folds already done are kept")


def summarise(reports):
    """{figure: (mean, sd)} over the folds; sd is the sample standard deviation, NaN for one fold."""
    summary = {}
    for figure in FIGURES:
        values = [report[figure] for report in reports]
        sd = statistics.stdev(values) if len(values) > 1 else math.nan
        summary[figure] = (statistics.fmean(values), sd)
    return summary


def result_json(args, training_args, folders, reports, summary):
    per_fold = [{"fold": fold, "data_dir": str(folder), "n": report["n"],
                 **{figure: report[figure] for figure in FIGURES},
                 "model_selection": report.get("model_selection"),
                 "report": str(Path(args.checkpoint) / FOLD_FOLDER.format(fold) / TEST_REPORT_DIR / "report.json")}
                for fold, (folder, report) in enumerate(zip(folders, reports))]
    return {"data_dir": str(args.data_dir), "dataset": args.dataset, "script": args.script,
            "training_args": training_args, "folds": per_fold,
            "mean": {figure: mean for figure, (mean, _) in summary.items()},
            "sd": {figure: None if math.isnan(sd) else sd for figure, (_, sd) in summary.items()}}


def main(argv=None):
    args, training_args = build_parser().parse_known_args(argv)
    taken = [flag for flag in OWN_FLAGS if any(arg.split("=")[0] == flag for arg in training_args)]
    if taken:
        raise SystemExit(f"crossval.py sets {', '.join(taken)} for each fold itself; drop it (--checkpoint names "
                         "the folder of all the folds' runs)")
    if "--overwrite" in training_args:
        raise SystemExit("crossval.py continues the folds already in --checkpoint; drop --overwrite, and delete a "
                         "fold's folder there (or pass another --checkpoint) to train it afresh")
    folders = fold_dirs(args.data_dir, args.dataset)
    checkpoint = Path(args.checkpoint)
    checkpoint.mkdir(parents=True, exist_ok=True)
    reports = [run_fold(fold, folder, checkpoint / FOLD_FOLDER.format(fold), args, training_args)
               for fold, folder in enumerate(folders)]
    summary = summarise(reports)
    path = checkpoint / RESULT_NAME
    atomic_write(path, json.dumps(result_json(args, training_args, folders, reports, summary), indent=2) + "\n")
    print(f"\n{args.dataset}, {len(folders)} folds, best model on valid scored on test (mean ± sd over the folds):")
    for fold, report in enumerate(reports):
        print(f"fold {fold}: n {report['n']}  MAE {report['mae']:.3f}  CA(3) {report['ca3']:.3f}  "
              f"CA(5) {report['ca5']:.3f}")
    print("  ".join(f"{name} {summary[figure][0]:.3f} ± {summary[figure][1]:.3f}"
                    for name, figure in zip(("MAE", "CA(3)", "CA(5)"), SUMMARY_FIGURES)))
    print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()
