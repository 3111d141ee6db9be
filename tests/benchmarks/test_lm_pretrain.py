"""benchmarks/lm_pretrain.py and its shared pieces (benchmarks/_lm.py): the corpus split, the
schedules, reach and the summary's arithmetic against hand computations on made-up curves,
and the --quick run's structure."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from benchmarks import _lm, lm_pretrain


def test_the_corpus_is_split_by_file_deterministically_into_vocabulary_characters() -> None:
    c = _lm.load_corpus(60_000, held_out_every=4)
    files = _lm.stdlib_files()
    taken = [f for f in files if f in c.train_files or f in c.held_out_files]
    assert taken == files[: len(taken)]  # whole files, in sorted order
    assert list(c.held_out_files) == taken[3::4] and not set(c.held_out_files) & set(c.train_files)
    assert c.chars >= 60_000 and set(c.train + c.held_out) <= set(_lm.VOCAB)
    assert not any(part in _lm.SKIP_DIRS for f in taken for part in f.split("/")[:-1])
    _lm.load_corpus.cache_clear()
    assert _lm.load_corpus(60_000, held_out_every=4) == c
    w = _lm.windows("abcdefg\n", 3)  # overlapping by one character: each character a target once
    assert w.tolist() == [[_lm.VOCAB.index(ch) for ch in "abcd"], [_lm.VOCAB.index(ch) for ch in "defg"]]


def test_schedules_by_hand() -> None:
    cos = _lm.Schedule("cosine", total=100)  # warm-up 5 ticks, cosine over 95 to 0.1
    assert [cos(t) for t in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert cos(5) == pytest.approx(1.0)
    assert cos(5 + 95 / 2) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cos(100) == pytest.approx(0.1) and cos(150) == pytest.approx(0.1)
    wsd = _lm.Schedule("wsd", total=100)  # the peak until tick 80, then linear to 0.1 at 100
    assert wsd(4) == pytest.approx(1.0) and wsd(79) == 1.0 and wsd(80) == 1.0
    assert wsd(90) == pytest.approx(1 - 0.9 * 0.5) and wsd(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="cosine"):
        _lm.Schedule("linear", total=10)


def test_reach_interpolates_in_loss_between_evaluations() -> None:
    curve = [{"step": 10 * i, "tokens": 160 * i, "wall_s": 1.0 * i, "loss": loss}
             for i, loss in enumerate([3.0, 2.0, 1.6, 1.2, 1.5])]
    # 1.5 lies a quarter of the way from 1.6 (step 20) to 1.2 (step 30)
    assert _lm.reach(curve, 1.5) == pytest.approx({"step": 22.5, "tokens": 360.0, "wall_s": 2.25})
    assert _lm.reach(curve, 3.5) == {"step": 0.0, "tokens": 0.0, "wall_s": 0.0}  # met at the first evaluation
    assert _lm.reach(curve, 1.0) is None
    curve[1]["loss"] = None  # a non-finite evaluation neither counts nor anchors
    assert _lm.reach(curve, 1.9)["step"] == pytest.approx(20 * (3.0 - 1.9) / (3.0 - 1.6))


def _row(arm: str, b0: int, lr: float, seed: int, final: float, *, steps: int = 100, wall: float = 10.0,
         curve: list | None = None) -> dict:
    return {"schedule": "cosine", "arm": arm, "b0": b0, "lr": lr, "seed": seed, "final_loss": final, "steps": steps,
            "tokens": 1600, "wall_s": wall, "max_batch_size": b0, "curve": curve or []}


def _point(step: float, tokens: float, wall: float, loss: float) -> dict:
    return {"step": step, "tokens": tokens, "wall_s": wall, "loss": loss}


def test_the_summary_arithmetic_matches_a_hand_computation() -> None:
    cfg = dataclasses.replace(lm_pretrain.QUICK, seeds=(0, 1, 2))  # sizes 8 and 16, close 2%
    runs = [
        # seed-0 grids: B=8 best at 0.008 (interior); B=16 best at its edge, 2.1 > 1.9 x 1.02
        _row("fixed", 8, 0.004, 0, 2.0), _row("fixed", 8, 0.008, 0, 1.9, wall=10.0), _row("fixed", 8, 0.016, 0, 1.95),
        _row("fixed", 16, 0.008, 0, 2.2), _row("fixed", 16, 0.016, 0, 2.1),
        _row("fixed", 8, 0.008, 1, 2.0, wall=12.0), _row("fixed", 8, 0.008, 2, 1.95, wall=11.0),
        # the default from B0 = 8: target 1.95 = mean(1.9, 2.0, 1.95); reference (means) 100 steps, 1600 tokens, 11 s
        _row("default", 8, 0.008, 0, 1.9, curve=[_point(30, 800, 3, 2.1), _point(50, 1600, 6, 1.9)]),
        _row("default", 8, 0.008, 1, 1.95, curve=[_point(30, 800, 3, 2.0), _point(50, 1600, 6, 1.95)]),
        _row("default", 8, 0.008, 2, 1.97, curve=[_point(30, 800, 3, 2.2), _point(50, 1600, 6, 1.97)]),
    ]
    s = lm_pretrain.summarise_schedule(runs, cfg)
    assert s["tuning"]["8"]["lr"] == 0.008 and s["tuning"]["8"]["interior"]
    assert s["tuning"]["16"]["lr"] == 0.016 and not s["tuning"]["16"]["interior"]
    assert s["all_seed_sizes"] == [8] and s["best_fixed"] == 8
    assert s["target_loss"] == pytest.approx(1.95)
    assert s["reference"] == pytest.approx({"step": 100, "tokens": 1600, "wall_s": 11.0})
    d = s["arms"]["default"]
    # seed 0: 1.95 is 3/4 of the way from 2.1 (step 30) to 1.9 (step 50): step 45, 1400 tokens, 5.25 s
    assert d["per_seed"][0]["ratios"] == pytest.approx({"step": 0.45, "tokens": 1400 / 1600, "wall_s": 5.25 / 11})
    # seed 1 reaches it at its last evaluation; seed 2 never (counted as infinite)
    assert d["per_seed"][1]["ratios"] == pytest.approx({"step": 0.5, "tokens": 1.0, "wall_s": 6 / 11})
    assert d["per_seed"][2]["reached"] is None and d["reached"] == 2
    assert d["median_ratios"] == pytest.approx({"step": 0.5, "tokens": 1.0, "wall_s": 6 / 11})
    # the mean curve: (30, 800, 3 s, loss 2.1) then (50, 1600, 6 s, loss 1.94); 1.95 is 15/16 of the way
    assert d["mean_ratios"] == pytest.approx({"step": 48.75 / 100, "tokens": 1550 / 1600, "wall_s": 5.8125 / 11})
    assert d["final_loss_mean"] == pytest.approx(1.94)
    assert d["final_vs_target"] == pytest.approx(1.94 / 1.95 - 1)
    assert [p["vs_fixed"] for p in d["paired"]] == pytest.approx([0.0, 1.95 / 2.0 - 1, 1.97 / 1.95 - 1])
    assert s["must_show"] == {"steps": True, "tokens": True, "final": True}  # 0.4875 <= 0.5, 0.97 <= 1.05, -0.5%
    assert s["arms"]["fixed B=16"]["seeds"] == [0] and s["arms"]["fixed B=8"]["median_ratios"]["step"] == math.inf
    assert _lm.mean_curve([[_point(1, 2, 3, 4.0)], [_point(1, 2, 3, None)]]) is None  # a diverged seed
    assert _lm.mean_curve([[_point(1, 2, 3, 4.0)], []]) is None
    runs[-1]["final_loss"] = 2.2  # mean 2.0167: +3.4% over the target
    assert lm_pretrain.summarise_schedule(runs, cfg)["must_show"]["final"] is False


@pytest.mark.slow  # about 40 tiny fits, ~15 s on 2 busy cores
def test_quick_run_writes_every_arm_under_both_schedules(tmp_path) -> None:
    out = tmp_path / "lm.json"
    assert lm_pretrain.main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["quick"] and data["task"]["held_out_files"] >= 1 and out.with_suffix(".png").exists()
    assert set(data["summary"]) == {"cosine", "wsd"}
    for schedule, s in data["summary"].items():
        assert set(s["arms"]) == {"fixed B=8", "fixed B=16", *lm_pretrain.arms(lm_pretrain.QUICK)}
        assert set(s["must_show"]) == {"steps", "tokens", "final"}
        for name in lm_pretrain.ALL_SEEDS:
            assert s["arms"][name]["seeds"] == [0, 1]
        rows = [r for r in data["runs"] if r["schedule"] == schedule]
        for r in rows:
            assert r["tokens"] == r["samples"] * 16 and r["curve"][-1]["step"] == r["steps"]
            assert r["samples"] == data["task"]["train_windows"]  # one pass, every window once
            assert [c["tokens"] for c in r["curve"]] == sorted(c["tokens"] for c in r["curve"])
            assert all(t[3] > 0 for t in r["trace"])
        ramp = next(r for r in rows if r["arm"] == "ramp")
        assert ramp["max_batch_size"] == 4 * ramp["b0"]  # doubled at 25% and 50%
    with pytest.raises(SystemExit):  # --quick never writes the benchmark's own file
        lm_pretrain.main(["--quick"])
