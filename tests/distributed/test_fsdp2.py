"""FSDP2 on velotune's model classes (issue 19 item 4's FSDP2 half, as far as it goes today): `fully_shard`
per decoder layer trains the LoRA model with the offloading checkpoint exactly as unsharded training does
(gloo, 2 CPU processes, each half the batch), on the fast path (whose step plan then resolves each layer's
projections inside the layer's call, after FSDP2's hook gathered its weights). The plain path sharded is
test_fsdp2_trainer.py's (the CPU's default path), so it is not launched a second time here."""

from __future__ import annotations

import json

import pytest


def test_fully_shard_per_decoder_layer_equals_unsharded_training(fsdp_runs):
    """fsdp2_worker.py's job ran first in the FSDP2 trainer test's two launches (conftest.py: fsdp_runs), on
    2 ranks and as one plain process, the fast path forced on."""
    fsdp2 = fsdp_runs[2]
    sharded, whole = (json.loads((fsdp2 / f"fsdp2-{n}.json").read_text()) for n in (2, 1))
    assert sharded["fast"] is whole["fast"] is True and sharded["checkpoint"] == "offload"
    assert sharded["per_layer"] is True and whole["per_layer"] is False  # sharded: projections resolved per layer
    assert sharded["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    assert whole["losses"][0] != whole["losses"][-1]
    assert sharded["adapter"].keys() == whole["adapter"].keys() and whole["adapter"]
    for name, values in whole["adapter"].items():
        assert sharded["adapter"][name] == pytest.approx(values, rel=1e-4, abs=1e-5), name
