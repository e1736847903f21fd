"""``python -m benchmarks sync``: the HLO reader, and jbn's traffic measured with it.

In the default set at P = 4 (tests/conftest.py's devices): a synchronized
forward + backward receives 24 bytes per feature per device in three all-reduces,
one of them in a conditional, and is exact on 1e4 + N(0, 1) from a fresh state.
The slow set runs the benchmark's own subprocesses at P = 8 and 64 and checks the
bytes do not change with P.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import run, sync  # noqa: E402

HLO = """\
HloModule step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

%again (p: (f32[3,8])) -> f32[3,8] {
  %p = (f32[3,8]{1,0}) parameter(0)
  %g = f32[3,8]{1,0} get-tuple-element((f32[3,8]{1,0}) %p), index=0
  ROOT %all-reduce.2 = f32[3,8]{1,0} all-reduce(f32[3,8]{1,0} %g), to_apply=%add
}

%same (q: (f32[3,8])) -> f32[3,8] {
  %q = (f32[3,8]{1,0}) parameter(0)
  ROOT %h = f32[3,8]{1,0} get-tuple-element((f32[3,8]{1,0}) %q), index=0
}

ENTRY %main (x: f32[4,8], y: bf16[2]) -> f32[3,8] {
  %x = f32[4,8]{1,0} parameter(0)
  %y = bf16[2]{0} parameter(1)
  %all-gather = f32[16,8]{1,0} all-gather(f32[4,8]{1,0} %x), dimensions={0}
  %all-reduce = (f32[2,8]{1,0}, bf16[2]{0}) all-reduce(f32[2,8]{1,0} %s, bf16[2]{0} %y), to_apply=%add
  %t = (f32[3,8]{1,0}) tuple(f32[3,8]{1,0} %z)
  ROOT %conditional = f32[3,8]{1,0} conditional(pred[] %c, (f32[3,8]{1,0}) %t, (f32[3,8]{1,0}) %t), true_computation=%again, false_computation=%same
}
"""


def test_reads_collectives_their_bytes_and_branches():
    found = sync.collectives(HLO)
    assert [(c.op, c.bytes, c.conditional) for c in found] == [
        ("all-reduce", 96, True),
        ("all-gather", 16 * 8 * 4, False),
        ("all-reduce", 2 * 8 * 4 + 2 * 2, False),
    ]
    assert sync.shape_bytes("(f32[2,8]{1,0}, bf16[2]{0})") == 68
    assert sync.shape_bytes("pred[]") == 1
    with pytest.raises(ValueError, match="unknown HLO element type 'q7'"):
        sync.shape_bytes("q7[2]")


def test_jbn_receives_24_bytes_per_feature_and_is_exact(four_devices):
    rows = {r["impl"]: r for r in sync.measure(4, time_it=False, pool=four_devices)}
    jbn_row = rows["jbn"]
    assert jbn_row["bytes"] == 24 * sync.FEATURES
    assert jbn_row["ops"] == ["all-reduce"] * 3
    assert jbn_row["conditional"] == 1
    assert abs(jbn_row["std"] - 1) < 1e-5
    assert jbn_row["vs_one_device"] < 1e-4
    assert rows["flax"]["ops"] and "all-gather" not in rows["flax"]["ops"]
    table = sync.table([jbn_row, rows["flax"]])
    assert "| 4 | jbn | 6.0 KiB | 24 B | 3 (1) |" in table


@pytest.mark.slow
def test_bytes_do_not_grow_with_the_devices(capsys):
    assert run.main(["sync", "--devices", "8", "64", "--no-time"]) == 0
    out = capsys.readouterr().out
    assert "| 8 | jbn | 6.0 KiB | 24 B | 3 (1) | 0.99999" in out
    assert "| 64 | jbn | 6.0 KiB | 24 B | 3 (1) | 0.99999" in out
