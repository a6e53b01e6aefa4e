"""GRU4Rec-style next-item model: embed each event, run a GRU, score the whole catalogue.

Training runs ``forward`` over whole sequences through ``nn.GRU``. Serving runs ``step``:
one recurrent step for a batch of users, written with plain tensor operations over the
same weights, so it exports to ONNX as simple MatMul, Sigmoid and Tanh nodes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from export.sequences import EVENT_TYPES, UNKNOWN_ITEM_INDEX


@dataclass(frozen=True)
class ModelConfig:
    """Shape and regularisation of the model."""

    num_items: int  # size of the item index space, including the unknown index 0
    num_event_types: int = len(EVENT_TYPES)
    embedding_size: int = 64
    hidden_size: int = 128
    num_layers: int = 1
    embedding_dropout: float = 0.4
    hidden_dropout: float = 0.4

    def __post_init__(self) -> None:
        if self.num_items < 2:
            raise ValueError(f"num_items={self.num_items}: the model needs at least one known item.")
        for name in ("num_event_types", "embedding_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        for name in ("embedding_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1).")

    def to_dict(self) -> dict:
        return asdict(self)


class GRU4Rec(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

        # Item and event type embeddings are summed, so both have embedding_size columns.
        self.item_embedding = nn.Embedding(config.num_items, config.embedding_size)
        self.event_type_embedding = nn.Embedding(config.num_event_types, config.embedding_size)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)

        # nn.GRU applies its own dropout between stacked layers only.
        self.gru = nn.GRU(
            input_size=config.embedding_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.hidden_dropout if config.num_layers > 1 else 0.0,
        )
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

        # Score = output embedding . hidden + bias, for every item in the catalogue.
        self.output_item_embedding = nn.Embedding(config.num_items, config.hidden_size)
        self.output_bias = nn.Parameter(torch.zeros(config.num_items))

        # Index 0 (unknown item) gets -inf in every score vector.
        unknown_mask = torch.zeros(config.num_items, dtype=torch.bool)
        unknown_mask[UNKNOWN_ITEM_INDEX] = True
        self.register_buffer("unknown_item_mask", unknown_mask, persistent=False)

        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.item_embedding.weight, std=0.05)
        nn.init.normal_(self.event_type_embedding.weight, std=0.05)
        nn.init.normal_(self.output_item_embedding.weight, std=0.05)
        # The unknown item enters the GRU as a neutral zero vector until training moves it.
        with torch.no_grad():
            self.item_embedding.weight[UNKNOWN_ITEM_INDEX].zero_()

    def initial_hidden(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(self.config.num_layers, batch_size, self.config.hidden_size)  # (layers, batch, hidden)

    def embed(self, items: torch.Tensor, event_types: torch.Tensor) -> torch.Tensor:
        """Embed events of any leading shape into (..., embedding_size)."""
        embedded = self.item_embedding(items) + self.event_type_embedding(event_types)  # (..., embedding)
        return self.embedding_dropout(embedded)

    def forward(
        self,
        items: torch.Tensor,  # (batch, time) int64
        event_types: torch.Tensor,  # (batch, time) int64
        hidden: torch.Tensor | None = None,  # (layers, batch, hidden)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the GRU over whole sequences and return per-step outputs and the final hidden state."""
        embedded = self.embed(items, event_types)  # (batch, time, embedding)
        outputs, hidden = self.gru(embedded, hidden)  # (batch, time, hidden), (layers, batch, hidden)
        return self.hidden_dropout(outputs), hidden

    def score(self, outputs: torch.Tensor) -> torch.Tensor:
        """Score every item from GRU outputs of shape (..., hidden), with -inf for index 0."""
        logits = outputs @ self.output_item_embedding.weight.T + self.output_bias  # (..., items)
        return logits.masked_fill(self.unknown_item_mask, float("-inf"))

    def step(
        self,
        item: torch.Tensor,  # (batch,) int64
        event_type: torch.Tensor,  # (batch,) int64
        hidden: torch.Tensor,  # (layers, batch, hidden)
        exclude_items: torch.Tensor,  # (batch, n_exclude) int64, padded with 0
        k: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply one event per user and return the new hidden state and the top-k items.

        The cell arithmetic is nn.GRU's, gate order (reset, update, new) included, so a
        chain of steps reproduces ``forward``. Scores of the items in ``exclude_items``
        and of index 0 are -inf before top-k.
        """
        layer_input = self.embed(item, event_type)  # (batch, embedding)
        new_hidden = []
        for layer in range(self.config.num_layers):
            layer_hidden = self._gru_cell(layer, layer_input, hidden[layer])  # (batch, hidden)
            new_hidden.append(layer_hidden)
            layer_input = layer_hidden
            if layer < self.config.num_layers - 1:
                layer_input = F.dropout(layer_input, self.gru.dropout, self.training)
        hidden_out = torch.stack(new_hidden)  # (layers, batch, hidden)

        scores = self.score(self.hidden_dropout(layer_input))  # (batch, items)
        scores = scores.scatter(1, exclude_items, float("-inf"))
        topk_scores, topk_items = torch.topk(scores, k, dim=1)  # (batch, k), (batch, k)
        return hidden_out, topk_scores, topk_items

    def _gru_cell(self, layer: int, layer_input: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        weight_ih = getattr(self.gru, f"weight_ih_l{layer}")  # (3 * hidden, input)
        weight_hh = getattr(self.gru, f"weight_hh_l{layer}")  # (3 * hidden, hidden)
        bias_ih = getattr(self.gru, f"bias_ih_l{layer}")  # (3 * hidden,)
        bias_hh = getattr(self.gru, f"bias_hh_l{layer}")  # (3 * hidden,)

        input_gates = layer_input @ weight_ih.T + bias_ih  # (batch, 3 * hidden)
        hidden_gates = hidden @ weight_hh.T + bias_hh  # (batch, 3 * hidden)
        input_reset, input_update, input_new = input_gates.chunk(3, dim=1)  # 3 x (batch, hidden)
        hidden_reset, hidden_update, hidden_new = hidden_gates.chunk(3, dim=1)  # 3 x (batch, hidden)

        reset = torch.sigmoid(input_reset + hidden_reset)
        update = torch.sigmoid(input_update + hidden_update)
        # The reset gate scales the hidden term after its bias is added, as in nn.GRU.
        candidate = torch.tanh(input_new + reset * hidden_new)
        return (1.0 - update) * candidate + update * hidden
