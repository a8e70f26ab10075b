"""The benchmark harness runs end to end (`bench.py --quick`: a 16 MiB idle heap moved by
stop-and-copy) and its JSON holds sane figures for a workload that verified its memory.
Figures are checked for plausibility only, never against a speed: this is no benchmark."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, umig_env

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="migrating needs root")


def test_quick_run_writes_sane_json(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick",
                          "--results", str(tmp_path)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                         env=umig_env(), cwd=REPO)
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    doc = json.loads((tmp_path / "quick.json").read_text())

    assert doc["machine"]["cores"] >= 1 and doc["machine"]["kernel"]
    rows = doc["rows"]
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["workload"], row["size_mib"], row["tool"], row["mode"]) == ("idle", 16, "umig", "stop")
    assert row["ok"] is True and row["verdict"].startswith("ok ")
    assert "wrong_pages=0" in row["verdict"]
    # The 16 MiB heap travelled, and not much more than it.
    assert 16 * 2**20 <= row["bytes"] <= 32 * 2**20
    # The process reported a gap; umig's own figures nest as they must (the freeze is part
    # of the migration, which is part of the command).
    assert row["frozen_s"] > 0
    assert 0 < row["tool_frozen_s"] <= row["total_s"] <= row["cli_wall_s"]
    assert row["cpu_s"] > 0 and row["agent_cpu_s"] >= 0 and row["client_cpu_s"] > 0
    assert row["agent_peak_rss"] > 0 and row["client_peak_rss"] > 0
    assert row["target_pid"] != row["source_pid"]
    # Where the time went: both sides' steps, the source's from its check to the commit.
    source, target = (dict(row["phases"][side]) for side in ("source", "target"))
    assert list(source)[:3] == ["check and connect", "freeze", "collect"] and "commit and resume" in source
    assert "pages (arriving)" in target and target["resume"] >= 0
    assert sum(source.values()) <= row["total_s"] * 1e3 + 1
    assert {t["result"] for t in doc["targets"]} <= {"pass", "FAIL", "n/a"}


def test_bounds_measures_every_stage():
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bounds.py"), "--mib", "16", "--repeat", "1"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                         env=umig_env(), cwd=REPO)
    assert res.returncode == 0, f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    for stage in ("read the process's memory", "xxh3 digest by the source", "ZeroMQ over loopback TCP",
                  "xxh3 digest, the target's check", "UFFDIO_COPY into the process"):
        assert stage in res.stdout
    assert "bound for a pipeline on" in res.stdout
