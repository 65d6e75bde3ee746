"""Run under ``torchrun --nproc_per_node 2`` by test_distributed.py: train-ldl.py's loop with the loss turned NaN
on one rank only, at that rank's CALL-th step; each rank writes how it ended to OUT_DIR/rank<r>.json.

    torchrun --nproc_per_node 2 tests/ddp_nan_loss.py RANK CALL OUT_DIR TRAIN_ARGS...

A rank that waits forever in an all-reduce never writes its file.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from test_robustness import NanAtCall  # noqa: E402


def main(poisoned_rank, call, out_dir, *args):
    rank = int(os.environ["RANK"])

    class NanOnOneRank(NanAtCall):
        NAN_CALL = int(call) if rank == int(poisoned_rank) else 0

    train.OBJECTIVES["ldl"] = NanOnOneRank
    code, message = 0, ""
    try:
        train.fit("ldl", list(args))
    except SystemExit as stop:
        code, message = (stop.code, "") if isinstance(stop.code, int) else (1, str(stop.code))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"code": code, "message": message}))
    if message:
        print(message, file=sys.stderr, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main(*sys.argv[1:])
