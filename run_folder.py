"""The run folder (--checkpoint): one run's files at a time, locked while it trains, replaced only on --overwrite."""
import shutil
from pathlib import Path

from checkpoint import BEST_NAME, LAST_NAME, TEST_REPORT_DIR
from files import check_output_dir, folder_lock, remove_stale_temp_files
from history import HISTORY_NAME
import run_record
from stopping import sigterm_unwinds
from tensorboard_log import EVENTS_DIR

# the files that make a run: a fresh run refuses a folder holding any of them (see --overwrite)
RUN_FILES = (LAST_NAME, BEST_NAME, HISTORY_NAME, run_record.RECORD_NAME)
# the folders a run writes besides: --overwrite replaces them with the files, so no report or event of the old run stays
RUN_FOLDERS = (TEST_REPORT_DIR, EVENTS_DIR)


def claim_checkpoint_dir(args, runtime, cleanup):
    """Check the folder is writable and lock it for the run's lifetime; never mix two runs' files in it.

    Returns the files of the run that --overwrite replaces. They are deleted only when this run writes its first
    file (delete_replaced), so a run refused by its checks, or stopped before its first checkpoint, leaves them
    whole.
    """
    if not runtime.is_main:
        return []
    folder = check_output_dir(args.checkpoint, "--checkpoint")
    cleanup.enter_context(folder_lock(folder))
    cleanup.enter_context(sigterm_unwinds())
    present = [name for name in RUN_FILES if (folder / name).exists()]
    continuing = args.resume is not None and Path(args.resume).resolve().parent == folder.resolve()
    if continuing and args.overwrite:
        raise SystemExit(
            f"--overwrite would delete the run that --resume {args.resume} continues, before it is read. Drop "
            f"--overwrite to continue that run in {folder}, or pass another --checkpoint folder for a new run from it."
        )
    if present and not (continuing or args.overwrite):
        raise SystemExit(
            f"{folder} already holds a run ({', '.join(present)}). Continue it with --resume {folder / LAST_NAME}, "
            f"pass another --checkpoint folder, or pass --overwrite to replace that run's files."
        )
    remove_stale_temp_files(folder, RUN_FILES)
    if not args.overwrite:
        return []
    return [folder / name for name in present] + [folder / name for name in RUN_FOLDERS if (folder / name).is_dir()]


def delete_replaced(paths):
    """Delete the old run's files and folders that --overwrite replaces (claim_checkpoint_dir's list)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
