"""The compile lane in `make test`: the representative kernel specializations compile ahead of time
for sm_90a and sm_80 (no GPU needed) within the register budget, with no spill and no stack frame.
The interpreter accepts code the compiler rejects and hides register pressure: this is the test
that would fail where a GPU user would."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lane_or_skip():
    pytest.importorskip("triton", reason="Triton is not installed (pip install 'egnn[triton]')")
    from egnn.kernels import resources

    why = resources.api_available()
    if why:
        pytest.skip(f"the compile lane needs Triton's ahead-of-time API: {why}")
    return resources


@pytest.mark.slow
def test_representative_kernels_compile_within_budget():
    R = _lane_or_skip()
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "profiling", "kernel_resources.py"), "--subset", "--json",
                          "--no-cache", "--jobs", "2", "--timeout", "600"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=1800)
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(R.representative()), res.stderr[-2000:]
    assert {r["kernel"] for r in rows} >= {"to_edge", "from_edge", "aggregate", "aggregate_plain", "so2_fwd",
                                           "so2_bwd"}
    assert {r["arch"] for r in rows} == {"sm_90a", "sm_80"}
    for r in rows:
        assert R.budget_violations(r) == [], (r["kernel"], r["arch"], r["lmax"], r["dtype"], R.budget_violations(r))
        assert r["registers"] > 0 and r["cubin_bytes"] > 0
    assert res.returncode == 0
