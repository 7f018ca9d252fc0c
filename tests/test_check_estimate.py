"""``peftcli check`` says what ``merge`` would do: its bytes against a real merge, its peak memory against a measured one."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from peftcli.preflight import check
from peftcli.checkpoint.writer import save_state_dict
from peftcli.cli import cli
from peftcli.diffing import DiffOptions, diff
from peftcli.injection import inject
from peftcli.merging.engine import merge
from peftcli.merging.estimate import RUNTIME_BYTES
from peftcli.methods import METHODS
from tests.helpers import noisy_copy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def _data_bytes(path: str) -> int:
    """Bytes of tensor data in a safetensors file: its size less the 8-byte length and the header."""
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return os.path.getsize(path) - 8 - header


def test_check_says_what_merge_would_do_and_its_bytes_are_the_merge_s(tiny_llama, tmp_path):
    a = noisy_copy(tiny_llama, str(tmp_path / "ftA"), 1)
    d = str(tmp_path / "b.diff")
    diff(tiny_llama, noisy_copy(tiny_llama, str(tmp_path / "ftB"), 2), d, DiffOptions(density=0.2))
    result = CliRunner().invoke(cli, ["check", tiny_llama, a, d, "--method", "ties", "--dtype", "BF16", "--json"])
    assert result.exit_code == 0, result.stderr
    est = json.loads(result.stdout)["merge"]
    report = merge(tiny_llama, [a, d], str(tmp_path / "m.safetensors"), method="ties", density=0.5, dtype="BF16")
    assert est["method"] == "ties" and est["changed_tensors"] == report.changed and est["tensors"] == report.tensors
    assert est["write_bytes"] == _data_bytes(str(tmp_path / "m.safetensors"))
    inputs = os.path.getsize(os.path.join(a, "model.safetensors")) + os.path.getsize(d)
    assert est["hash_bytes"] == inputs
    assert est["read_bytes"] == inputs + os.path.getsize(os.path.join(tiny_llama, "model.safetensors"))
    text = CliRunner().invoke(cli, ["check", tiny_llama, a, d]).stdout
    assert f"merge (linear): changes {report.changed} of {report.tensors} tensors" in text and "peak memory ≈" in text


def test_a_method_that_does_not_fold_is_named_and_another_base_s_checkpoint_fails(tiny_llama, tiny_bert, tmp_path):
    run = str(tmp_path / "prompt")
    inject(tiny_llama, "prompt", METHODS["prompt"].config_cls(), run)
    out = CliRunner().invoke(cli, ["check", tiny_llama, run]).stdout
    assert out.strip().splitlines()[-1].startswith(f"merge would refuse: {run}: prompt adds computation")
    other = check(tiny_llama, [noisy_copy(tiny_bert, str(tmp_path / "bert-ft"), 1)])
    assert not other.ok and other.merge is None
    assert "not a fine-tune of this base" in other.artifacts[0].problems[0].message


def _peak_rss_of_merge(base: str, inputs: list[str], out: str, **options) -> int:
    """VmHWM of a fresh process running the merge (its own high-water mark, not its parent's)."""
    script = textwrap.dedent(
        f"""
        from peftcli.merging.engine import merge
        merge({base!r}, {inputs!r}, {out!r}, **{options!r})
        print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(proc.stdout.split()[-1]) * 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_the_peak_memory_estimate_bounds_the_measured_peak_and_follows_its_formula(tmp_path):
    n = 4 << 20  # one tensor of 16 MB: what TIES holds of it whole is well above the noise
    g = torch.Generator().manual_seed(0)
    base = str(tmp_path / "base")
    save_state_dict({"big.weight": torch.randn(n, generator=g), "small.weight": torch.randn(64, generator=g)}, base)
    fts = [noisy_copy(base, str(tmp_path / f"ft{i}"), i) for i in (1, 2)]
    peaks, estimates = {}, {}
    for method, density in (("linear", None), ("ties", 0.5), ("dare-ties", 0.5)):
        estimates[method] = check(base, fts, method=method).merge.peak_bytes
        peaks[method] = _peak_rss_of_merge(base, fts, str(tmp_path / method), method=method, density=density)
        assert peaks[method] <= estimates[method], (method, peaks[method], estimates[method])
        assert estimates[method] - peaks[method] < RUNTIME_BYTES  # the allowance for the runtime is the slack
    formula = estimates["ties"] - estimates["linear"]  # (k + 1) × 4N: both φ in fp32 and the ranked |φ|
    assert formula == 3 * 4 * n
    measured = peaks["ties"] - peaks["linear"]
    assert 0.6 * formula <= measured <= formula + 16 * 2**20, (measured, formula)
    # DARE draws its masks range by range: not even one whole-tensor copy (16 MB; the whole path
    # held 10 of them). The margin is RSS noise between two fresh processes (~9 MB seen).
    assert estimates["dare-ties"] == estimates["linear"]
    assert peaks["dare-ties"] - peaks["linear"] < 16 * 2**20, (peaks["dare-ties"], peaks["linear"])
