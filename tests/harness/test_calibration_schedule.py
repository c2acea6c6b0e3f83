"""When the teacher's τ is refitted (mc.tau: auto): gaps doubling from calibrate_first, capped."""
from types import SimpleNamespace

from harness.step import next_fit


def fits(first: int, every: int, until: int) -> list[int]:
    mc, out = SimpleNamespace(calibrate_first=first, calibrate_every=every), [0]
    while next_fit(out[-1], mc) < until:
        out.append(next_fit(out[-1], mc))
    return out


def test_gaps_double_from_the_first_then_stay_at_the_cap():
    assert fits(10, 500, 2000) == [0, 10, 20, 40, 80, 160, 320, 640, 1140, 1640]


def test_a_first_gap_equal_to_the_cap_is_a_fixed_interval():
    assert fits(100, 100, 350) == [0, 100, 200, 300]
