"""The suite's waits on work: as long as the work advances, however slow; a failure once it has stopped."""

from __future__ import annotations

import sys
import time

import pytest
from preannotate.training.jobs import JobStore

from tests.conftest import files_activity, job_activity, run_while_advancing, wait_while_advancing


def test_a_wait_lasts_as_long_as_the_work_advances_and_fails_once_it_stops():
    started = time.monotonic()
    ticking = lambda: int((time.monotonic() - started) * 20)  # noqa: E731  progress every 50 ms
    assert wait_while_advancing(lambda: time.monotonic() - started > 1.0 and "done", ticking, "work",
                                stalled_s=0.3, poll_s=0.01) == "done"  # three times longer than stalled_s
    with pytest.raises(AssertionError, match=r"^stuck work stopped advancing: nothing moved for 0.2 s"):
        wait_while_advancing(lambda: False, lambda: 1, "stuck work", stalled_s=0.2, poll_s=0.01)


def test_files_activity_sees_a_file_written_or_grown(tmp_path):
    snapshot = files_activity(tmp_path, tmp_path / "missing.log")
    before = snapshot()
    assert snapshot() == before
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    grown = snapshot()
    assert grown != before
    with open(tmp_path / "run" / "metrics.jsonl", "a") as metrics:
        metrics.write("{}\n")
    assert snapshot() != grown


def test_job_activity_moves_with_the_jobs_state_and_step(tmp_path):
    jobs = JobStore(tmp_path)
    job = jobs.create({})
    snapshot = job_activity(jobs, job.id)
    queued = snapshot()
    jobs.update(job.id, lambda j: setattr(j, "state", "running"))
    running = snapshot()
    (jobs.work_dir(job.id) / "run").mkdir()
    (jobs.work_dir(job.id) / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert len({queued, running, snapshot()}) == 3 and snapshot()[:2] == ("running", 1)


def test_a_process_run_to_its_end_or_killed_once_it_stalls(tmp_path):
    done = run_while_advancing([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
    assert (done.returncode, done.stdout, done.stderr) == (0, "out\n", "err\n")
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"stopped advancing: nothing moved for 0.5 s"):
        run_while_advancing([sys.executable, "-c", "import time; time.sleep(600)"], stalled_s=0.5)
    assert time.monotonic() - started < 300  # killed, not waited out
