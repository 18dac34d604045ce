import torch

from lightning_desloc.ledger import CommLedger


def test_ratio_counts_everything_but_the_setup_broadcast():
    ledger = CommLedger()
    ledger.record({"setup": 1000})
    ledger.record({"params": 100, "state/exp_avg": 100})
    ledger.record({"control": 8})
    ledger.add_ddp_equivalent(gradient_bytes=100, steps=10)
    assert ledger.rounds == 3
    assert ledger.total_bytes == 1208
    assert ledger.sync_bytes == 200
    assert ledger.compared_bytes == 208
    assert ledger.ratio_vs_ddp == 1000 / 208
    assert ledger.bytes_saved == 1000 - 208
    metrics = ledger.as_dict()
    assert metrics["comm/bytes/state/exp_avg"] == 100.0
    assert metrics["comm/rounds"] == 3.0


def test_state_dict_round_trip():
    a = CommLedger()
    a.record({"params": 4})
    a.add_ddp_equivalent(4, 3)
    b = CommLedger()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert CommLedger().ratio_vs_ddp == float("inf")


def test_ddp_equivalent_bytes_follow_unfreezing_inside_a_param_group():
    """A fine-tuning recipe that unfreezes a backbone the optimizer already holds (no new param group):
    the DDP-equivalent bytes of the next step count it, hand-computed from the layer sizes."""
    from lightning_desloc.sync import _GradientBytes

    backbone, head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)  # 144 and 68 float32 parameters
    backbone.requires_grad_(False)
    optimizer = torch.optim.AdamW([*backbone.parameters(), *head.parameters()], lr=1e-3)
    measure = _GradientBytes()
    assert measure(optimizer) == 68 * 4
    backbone.requires_grad_(True)
    assert measure(optimizer) == (144 + 68) * 4
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})  # a callback's new group
    assert measure(optimizer) == (144 + 68 + 3) * 4
