"""The mixed-precision plots' numbers: the solver's front, the uniform and heuristic points, from a
planner record alone; and the two PNGs written from a record."""

from __future__ import annotations

import random

import pytest

from quantdeploy.eval.mixed_report import front, heuristic_point, slots, uniform_points, write_mixed_plots
from quantdeploy.quant.mixed.allocate import allocate
from quantdeploy.quant.mixed.sensitivity import KEEP, Sensitivity

BITS = {KEEP: 16.0, "int8-sym-per-channel": 8.03, "int4-sym-g32": 4.5, "int4-sym-g128": 4.13, "int3-sym-g64": 3.25}


def _sensitivity(blocks: int = 4, seed: int = 0) -> Sensitivity:
    rng = random.Random(seed)
    cost, bits, numel = {}, {}, {}
    for b in range(blocks):
        for proj in ("self_attn.q_proj", "mlp.down_proj"):
            name = f"model.layers.{b}.{proj}"
            scale = rng.uniform(0.01, 1.0) * (4 if b in (0, blocks - 1) else 1)
            cost[name] = {KEEP: 0.0, "int8-sym-per-channel": 0.001 * scale, "int4-sym-g32": 0.05 * scale,
                          "int4-sym-g128": 0.08 * scale, "int3-sym-g64": 0.4 * scale}
            bits[name] = dict(BITS)
            numel[name] = rng.choice([1000, 3000])
    return Sensitivity(cost=cost, bits=bits, numel=numel, specs={})


def test_the_front_spends_more_bits_for_less_predicted_kld():
    sens = _sensitivity()
    points = front(sens)
    assert points[0][0] == pytest.approx(3.25) and points[-1][0] == pytest.approx(8.03)
    for (b0, k0), (b1, k1) in zip(points, points[1:]):
        assert b1 >= b0 - 1e-9 and k1 <= k0 + 1e-12


def test_uniform_and_heuristic_points_are_the_sums_they_name():
    sens = _sensitivity()
    assert [label for label, _ in slots(sens)] == ["int3-sym-g64", "int4-sym-g128", "int4-sym-g32", "int8-sym-per-channel"]
    uniform = uniform_points(sens)
    bits, kld = uniform["int4-sym-g32"]
    assert bits == pytest.approx(4.5)
    assert kld == pytest.approx(sum(c["int4-sym-g32"] for c in sens.cost.values()))
    label, (hbits, hkld) = heuristic_point(sens)
    assert label == "blocks 0 and 3 int8-sym-per-channel, rest int4-sym-g128"
    ends = [n for n in sens.cost if n.startswith(("model.layers.0.", "model.layers.3."))]
    assert hkld == pytest.approx(sum(sens.cost[n]["int8-sym-per-channel" if n in ends else "int4-sym-g128"]
                                     for n in sens.cost))
    # the solver at the heuristic's bits predicts no more than the heuristic (it may choose the same)
    assert allocate(sens, hbits).predicted_kld <= hkld + 1e-12


def test_a_candidate_that_reads_differently_by_layer_is_one_column():
    """RTN's groups of 128 are groups of 96 on a 576-wide layer: the same candidate, one column."""
    sens = _sensitivity()
    narrow = "model.layers.2.self_attn.q_proj"
    sens.cost[narrow] = {("int4-sym-g96" if o == "int4-sym-g128" else o): c for o, c in sens.cost[narrow].items()}
    sens.bits[narrow] = {("int4-sym-g96" if o == "int4-sym-g128" else o): b for o, b in sens.bits[narrow].items()}
    columns = dict(slots(sens))
    assert columns["int4-sym-g128/int4-sym-g96"][narrow] == "int4-sym-g96"
    label, _ = heuristic_point(sens)
    assert label.endswith("rest int4-sym-g128/int4-sym-g96")


def test_a_pinned_layer_keeps_its_pin_in_the_uniform_points():
    sens = _sensitivity()
    pinned = "model.layers.1.mlp.down_proj"
    sens.cost[pinned] = {"int8-sym-per-channel": sens.cost[pinned]["int8-sym-per-channel"]}
    sens.bits[pinned] = {"int8-sym-per-channel": 8.03}
    _, kld = uniform_points(sens)["int3-sym-g64"]
    assert kld == pytest.approx(sum(c.get("int3-sym-g64", c.get("int8-sym-per-channel")) for c in sens.cost.values()))


def test_the_plots_are_written_from_a_record(tmp_path):
    sens = _sensitivity()
    alloc = allocate(sens, 4.5)
    record = {"allocation": alloc.to_dict(), "measured_kld": alloc.predicted_kld * 1.2,
              "sensitivity": {"cost": sens.cost, "bits": sens.bits, "numel": sens.numel, "specs": {}}}
    written = write_mixed_plots(record, tmp_path / "plots")
    assert [p.name for p in written] == ["sensitivity.png", "bits_vs_kld.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
