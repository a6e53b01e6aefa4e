from __future__ import annotations

import pytest
import torch

from export.model import GRU4Rec, ModelConfig


def tiny_model(num_layers: int = 1, seed: int = 0) -> GRU4Rec:
    torch.manual_seed(seed)
    config = ModelConfig(num_items=40, embedding_size=8, hidden_size=12, num_layers=num_layers)
    model = GRU4Rec(config).eval()
    # Larger weights than the default init make the recurrence non-trivial.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.5)
    return model


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_step_chain_equals_unrolled_gru(num_layers):
    model = tiny_model(num_layers)
    items = torch.randint(1, 40, (3, 15))  # (batch, time)
    event_types = torch.randint(0, 5, (3, 15))  # (batch, time)

    with torch.no_grad():
        outputs, final_hidden = model(items, event_types)  # (batch, time, hidden), (layers, batch, hidden)
        hidden = model.initial_hidden(3)
        no_exclusion = torch.zeros(3, 0, dtype=torch.int64)
        for t in range(15):
            hidden, scores, top = model.step(items[:, t], event_types[:, t], hidden, no_exclusion, k=5)
            expected_scores, expected_top = torch.topk(model.score(outputs[:, t]), 5, dim=1)

            torch.testing.assert_close(hidden[-1], outputs[:, t], rtol=0, atol=1e-6)
            torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)
            assert torch.equal(top, expected_top)

    torch.testing.assert_close(hidden, final_hidden, rtol=0, atol=1e-6)


def test_step_from_given_hidden_equals_gru():
    model = tiny_model(num_layers=2)
    start = torch.rand(2, 4, 12) * 2 - 1  # (layers, batch, hidden)
    items = torch.randint(0, 40, (4,))
    event_types = torch.randint(0, 5, (4,))

    with torch.no_grad():
        _, expected = model(items[:, None], event_types[:, None], start)
        hidden, _, _ = model.step(items, event_types, start, torch.zeros(4, 0, dtype=torch.int64), k=3)

    torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-6)


def test_step_excludes_items_and_never_returns_unknown():
    model = tiny_model()
    with torch.no_grad():
        # Make index 0 and items 5, 6 the highest scoring, then exclude 5 and 6.
        model.output_bias[0] = 1e6
        model.output_bias[5] = 1e5
        model.output_bias[6] = 1e5
        exclude = torch.tensor([[5, 6, 0], [5, 0, 0]])  # (batch, n_exclude), zero-padded
        _, scores, top = model.step(
            torch.tensor([1, 2]), torch.tensor([4, 4]), model.initial_hidden(2), exclude, k=36
        )

    # Row 0 has exactly 36 items left: 39 known items less the two excluded.
    assert top.shape == (2, 36)
    assert scores.shape == (2, 36)
    assert torch.isfinite(scores).all()
    assert not {0, 5, 6} & set(top[0].tolist())
    assert not {0, 5} & set(top[1].tolist())
    assert top[1, 0].item() == 6


def test_score_gives_unknown_index_minus_inf():
    model = tiny_model()

    logits = model.score(torch.randn(2, 3, 12))  # (batch, time, items)

    assert logits.shape == (2, 3, 40)
    assert torch.isneginf(logits[..., 0]).all()
    assert torch.isfinite(logits[..., 1:]).all()


def test_unknown_item_embedding_starts_at_zero():
    model = GRU4Rec(ModelConfig(num_items=10))

    assert torch.count_nonzero(model.item_embedding.weight[0]) == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_items", 1), ("hidden_size", 0), ("num_layers", 0), ("embedding_dropout", 1.0), ("hidden_dropout", -0.1)],
)
def test_config_rejects_invalid_values(field, value):
    arguments = {"num_items": 10, field: value}

    with pytest.raises(ValueError, match=field):
        ModelConfig(**arguments)


def test_default_config_sizes():
    config = ModelConfig(num_items=10)

    assert (config.embedding_size, config.hidden_size, config.num_layers) == (64, 128, 1)
    assert config.num_event_types == 5
