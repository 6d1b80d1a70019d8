"""Phase timings: exclusive seconds per phase in every manifest, and the summary line."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from stages.core import phase_timing
from stages.core.handoff import MANIFEST
from stages.core.phase_timing import PHASES, PhaseClock
from stages.dpo import recipe as dpo
from stages.sft import recipe as sft
from tests.test_dpo import PAIRS_FAST


class FakeClock:
    """perf_counter returning the next of the given instants."""

    def __init__(self, *instants: float) -> None:
        self.instants = list(instants)

    def __call__(self) -> float:
        return self.instants.pop(0)


def test_nested_phases_count_each_second_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # start 0 | load 1..7 with data 3..6 inside | train 8..18 | report at 20
    fake = FakeClock(0.0, 1.0, 3.0, 6.0, 7.0, 8.0, 18.0, 20.0)
    monkeypatch.setattr(phase_timing.time, "perf_counter", fake)
    clock = PhaseClock()
    clock.start()
    with clock.phase("load"), clock.phase("data"):
        pass
    with clock.phase("train"):
        pass
    times = clock.report()
    assert times.phases == {"load": 3.0, "data": 3.0, "train": 10.0}  # load: 1..3 + 6..7
    assert list(times.phases) == ["load", "data", "train"]  # PHASES order
    assert times.seconds == 20.0 and times.other == 4.0  # 0..1, 7..8, 18..20
    assert times.summary("sft") == "sft: 20.0 s | load 3.0 · data 3.0 · train 10.0 · other 4.0"
    assert times.as_manifest() == {
        "seconds": 20.0,
        "phases": {"load": 3.0, "data": 3.0, "train": 10.0},
        "other": 4.0,
    }
    assert not fake.instants  # every phase boundary read the clock exactly once


def test_report_inside_a_phase_charges_it_up_to_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(phase_timing.time, "perf_counter", FakeClock(0.0, 2.0, 5.0, 9.0))
    clock = PhaseClock()
    clock.start()
    with clock.phase("save"):
        times = clock.report()  # at 5.0
    assert times.phases == {"save": 3.0} and times.seconds == 5.0 and times.other == 2.0


def test_unknown_phase_and_untimed_work() -> None:
    clock = PhaseClock()
    with clock.phase("train"):  # before start(): checks before `with stage:` are not timed
        pass
    assert clock.report().phases == {}
    clock.start()
    with (
        pytest.raises(ValueError, match="unknown phase 'training'; one of load, data"),
        clock.phase("training"),
    ):
        pass


def _timings(run_dir: Path) -> dict:
    return json.loads((run_dir / MANIFEST).read_text())["timings"]


def test_sft_then_dpo_manifests_split_their_wall_time_into_phases(
    compose_cfg, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="stages.core.lifecycle")
    sft.run(compose_cfg())
    dpo.run(compose_cfg("stage=dpo", *PAIRS_FAST))
    for stage in ("sft", "dpo"):
        timings = _timings(tmp_path / "runs" / "toy" / stage)
        phases = timings["phases"]
        # SFT: load the base, tokenize, train, evaluate, save; DPO also samples its pairs.
        assert set(phases) == set(PHASES), (stage, phases)
        assert all(seconds > 0 for seconds in phases.values()), phases
        accounted = sum(phases.values()) + timings["other"]
        assert accounted == pytest.approx(timings["seconds"], abs=0.05)
        assert timings["finished"] > timings["started"]
        summary = re.compile(rf"^{stage}: [0-9.]+ s \| load [0-9.]+ · .* · other [0-9.]+$")
        lines = [r.getMessage() for r in caplog.records if summary.match(r.getMessage())]
        assert len(lines) == 1, [r.getMessage() for r in caplog.records]
