"""Back ends for tests: deterministic, instant (FakeBackend) or deliberately slow
(SlowBackend, for kill-and-resume tests run in a subprocess). No JAX needed."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import numpy as np

from cbs.sweep.backend import Backend, BlockResult, CellResult, HParamSpec, OptimizerSpec
from cbs.sweep.schema import ConfigError, spec


@dataclasses.dataclass(frozen=True)
class FakeSection:
    scale: float = spec(1.0, doc="steps = scale * (100 + 1000/B) / lr**0.1", gt=0)


class FakeBackend(Backend):
    """steps(B) = scale*(100 + 1000/B)/lr^0.1 exactly; lr > 10 diverges. No JAX needed."""

    name = "fake"
    Section = FakeSection
    optimizers = {
        "plain": OptimizerSpec("plain", {}),
        "heavy": OptimizerSpec("with a knob", {"momentum": HParamSpec(0.0, "knob", ge=0, lt=1)}),
    }
    metrics = {"loss": "a loss"}
    blocks_per_call = 2
    calls: list = []

    @classmethod
    def check(cls, config):
        if config.target.value is not None and config.target.value <= 0:
            raise ConfigError(
                "target.value", config.target.value, "allowed: > 0 (the loss is positive)"
            )

    def steps_of(self, c) -> tuple[float, bool]:
        """(steps to target, diverged) of a cell: the back end's law (subclasses change it)."""
        s = (
            self.config.section.scale
            * (100 + 1000 / c.batch_size)
            / c.lr**0.1
            * (1 - c.hparams.get("momentum", 0) / 2)
        )
        return s, c.lr > 10

    def run_blocks(self, blocks):
        type(self).calls.append([b.block_id for b in blocks])
        out = []
        budget = self.config.budget.max_steps
        for b in blocks:
            recs = []
            for c in b.cells:
                s, diverged = self.steps_of(c)
                reached = not diverged and s <= budget
                recs.append(
                    CellResult(
                        c.cell_id,
                        reached,
                        diverged,
                        math.ceil(s) if reached else math.nan,
                        math.nan if diverged else 0.5,
                        0.4,
                        budget,
                    )
                )
            out.append(BlockResult(recs))
        return out

    def reference_curves(self, batch_sizes):
        return {"floor": 100 + 0 * np.asarray(batch_sizes)}


class SlowBackend(FakeBackend):
    """FakeBackend that takes 0.1 s per block, one block per call.

    With ``CBS_TEST_STALL_AFTER=k`` in the environment, every call after the k-th hangs, so a
    test that kills the process once k parts are on disk knows exactly how many finished,
    however loaded the machine (a poller that races a 0.1 s block can lose on a busy CI box).
    """

    name = "slow"
    blocks_per_call = 1
    calls_made = 0

    def run_blocks(self, blocks):
        stall_after = os.environ.get("CBS_TEST_STALL_AFTER")
        if stall_after is not None and SlowBackend.calls_made >= int(stall_after):
            time.sleep(3600)  # the test kills this process
        SlowBackend.calls_made += 1
        # CBS_TEST_BLOCK_S: a slower process, for tests that need one to lag the others
        time.sleep(float(os.environ.get("CBS_TEST_BLOCK_S", 0.1)))
        return super().run_blocks(blocks)


def sweep_command(cfg_path, out, *extra) -> list[str]:
    """``python -m cbs.sweep CONFIG output.dir=OUT`` quietly (no progress, no analysis)."""
    return [
        sys.executable,
        "-m",
        "cbs.sweep",
        str(cfg_path),
        f"output.dir={out}",
        "--no-progress",
        "--no-analysis",
        *extra,
    ]
