"""GRU4Rec-style next-item model: embed each event, run a GRU or LSTM, score the catalogue.

An event's input vector is the sum of its item embedding, its event-type embedding and,
when configured, the mean embedding of the item's side features (genres, release decade,
categories) and a projection of the event's value (a rating). Training runs ``forward``
over whole sequences through ``nn.GRU`` or ``nn.LSTM``. Serving runs ``step``: one
recurrent step for a batch of users, written with plain tensor operations over the same
weights, so it exports to ONNX as simple Gather, MatMul, Sigmoid and Tanh nodes. The item
feature table is a constant of the model, so the step graph gathers an item's features by
its index and the worker needs no feature lookup.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from export.sequences import EVENT_TYPES, UNKNOWN_ITEM_INDEX

CELLS = ("gru", "lstm")

# Recurrent state: the hidden state (layers, batch, hidden) for a GRU, or the pair
# (hidden, cell state) of that shape for an LSTM.
RecurrentState = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ModelConfig:
    """Shape and regularisation of the model."""

    num_items: int  # size of the item index space, including the unknown index 0
    num_event_types: int = len(EVENT_TYPES)
    cell: str = "gru"
    embedding_size: int = 64
    hidden_size: int = 128
    num_layers: int = 1
    # Score items with the input item embedding (through a hidden-to-embedding projection
    # when the sizes differ) instead of a separate output embedding.
    tied_embeddings: bool = False
    embedding_dropout: float = 0.4
    hidden_dropout: float = 0.4
    # Columns of the item feature table; 0 means the model uses no item features.
    num_item_features: int = 0
    # Add a projection of the event's value (and whether it has one) to the input vector.
    use_event_value: bool = False
    # Add a second head: the probability that an interaction with an item is strong
    # (export.sequences.STRONG_EVENT_TYPES, or a high rating). Off by default so that
    # checkpoints written before the head existed still load.
    conversion_head: bool = False

    def __post_init__(self) -> None:
        if self.num_items < 2:
            raise ValueError(f"num_items={self.num_items}: the model needs at least one known item.")
        if self.cell not in CELLS:
            raise ValueError(f"cell={self.cell!r} is not supported; expected one of {', '.join(CELLS)}.")
        for name in ("num_event_types", "embedding_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.num_item_features < 0:
            raise ValueError(f"num_item_features={self.num_item_features} must not be negative.")
        for name in ("embedding_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1).")

    @property
    def has_cell_state(self) -> bool:
        return self.cell == "lstm"

    def to_dict(self) -> dict:
        return asdict(self)


class GRU4Rec(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

        # Every input part has embedding_size columns, because the parts are summed.
        self.item_embedding = nn.Embedding(config.num_items, config.embedding_size)
        self.event_type_embedding = nn.Embedding(config.num_event_types, config.embedding_size)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)

        # nn.GRU and nn.LSTM apply their own dropout between stacked layers only.
        rnn_class = nn.LSTM if config.has_cell_state else nn.GRU
        self.rnn = rnn_class(
            input_size=config.embedding_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            dropout=config.hidden_dropout if config.num_layers > 1 else 0.0,
        )
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

        # Score = output embedding . hidden + bias, for every item in the catalogue.
        if not config.tied_embeddings:
            self.output_item_embedding = nn.Embedding(config.num_items, config.hidden_size)
        self.output_bias = nn.Parameter(torch.zeros(config.num_items))

        # Index 0 (unknown item) gets -inf in every score vector.
        unknown_mask = torch.zeros(config.num_items, dtype=torch.bool)
        unknown_mask[UNKNOWN_ITEM_INDEX] = True
        self.register_buffer("unknown_item_mask", unknown_mask, persistent=False)

        # Optional parts are created after the ones above, so that a configuration without
        # them draws the same initial weights from a given seed.
        if config.tied_embeddings and config.hidden_size != config.embedding_size:
            self.output_projection = nn.Linear(config.hidden_size, config.embedding_size, bias=False)
        if config.num_item_features:
            # Rows are normalised to sum to 1, so an item's feature vector is the mean
            # embedding of its features. Filled by set_item_features; saved with the weights.
            self.register_buffer("item_feature_table", torch.zeros(config.num_items, config.num_item_features))
            self.feature_embedding = nn.Linear(config.num_item_features, config.embedding_size, bias=False)
        if config.use_event_value:
            # (center, scale) standardise the value; set by set_value_scaling from training data.
            self.register_buffer("value_scaling", torch.tensor([0.0, 1.0]))
            self.value_projection = nn.Linear(2, config.embedding_size, bias=False)

        self._init_weights()
        # The head draws its random weights after every other part has drawn its own, so a
        # configuration without it starts from the same weights for a given seed.
        if config.conversion_head:
            self._add_conversion_head()

    def _init_weights(self) -> None:
        nn.init.normal_(self.item_embedding.weight, std=0.05)
        nn.init.normal_(self.event_type_embedding.weight, std=0.05)
        if not self.config.tied_embeddings:
            nn.init.normal_(self.output_item_embedding.weight, std=0.05)
        # The unknown item enters the cell as a neutral zero vector until training moves it.
        with torch.no_grad():
            self.item_embedding.weight[UNKNOWN_ITEM_INDEX].zero_()
        if self.config.num_item_features:
            nn.init.normal_(self.feature_embedding.weight, std=0.05)
        if self.config.use_event_value:
            nn.init.normal_(self.value_projection.weight, std=0.05)

    def _add_conversion_head(self) -> None:
        # Conversion logit(h, i) = projection(h) . conversion_item_embedding[i]
        # + conversion_bias[i] + conversion_offset. The per-item bias learns each item's
        # base rate, and the shared offset the overall rate for items seen rarely.
        config = self.config
        # The head draws its initial weights without advancing the global random state, so
        # the rest of training (dropout masks included) runs as it would without the head.
        with torch.random.fork_rng(devices=[]):
            self.conversion_projection = nn.Linear(config.hidden_size, config.embedding_size, bias=False)
            self.conversion_item_embedding = nn.Embedding(config.num_items, config.embedding_size)
            nn.init.normal_(self.conversion_item_embedding.weight, std=0.05)
        self.conversion_bias = nn.Parameter(torch.zeros(config.num_items))
        self.conversion_offset = nn.Parameter(torch.zeros(()))

    # -- constants from the training data ----------------------------------------------------

    def set_item_features(self, table: np.ndarray) -> None:
        """Store the (num_items, num_item_features) 0/1 feature table, rows normalised to mean."""
        expected = (self.config.num_items, self.config.num_item_features)
        if table.shape != expected:
            raise ValueError(f"Item feature table has shape {table.shape}, expected {expected}.")
        counts = table.sum(axis=1, keepdims=True)
        normalised = np.divide(table, counts, out=np.zeros_like(table, dtype=np.float64), where=counts > 0)
        self.item_feature_table.copy_(torch.from_numpy(normalised.astype(np.float32)))

    def set_value_scaling(self, center: float, scale: float) -> None:
        """Standardise event values as (value - center) / scale before the projection."""
        if not scale > 0:
            raise ValueError(f"Event value scale {scale} must be positive.")
        self.value_scaling.copy_(torch.tensor([center, scale]))

    # -- training path ------------------------------------------------------------------------

    def initial_state(self, batch_size: int) -> RecurrentState:
        zeros = torch.zeros(self.config.num_layers, batch_size, self.config.hidden_size)  # (layers, batch, hidden)
        if self.config.has_cell_state:
            return zeros, zeros.clone()
        return zeros

    def initial_hidden(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(self.config.num_layers, batch_size, self.config.hidden_size)  # (layers, batch, hidden)

    def embed(
        self, items: torch.Tensor, event_types: torch.Tensor, values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embed events of any leading shape into (..., embedding_size).

        ``values`` has the shape of ``items``, with NaN where an event has no value. It is
        ignored unless the model uses event values, and then None means no event has one.
        """
        embedded = self.item_embedding(items) + self.event_type_embedding(event_types)  # (..., embedding)
        if self.config.num_item_features:
            features = self.item_feature_table[items]  # (..., features)
            embedded = embedded + self.feature_embedding(features)
        if self.config.use_event_value:
            embedded = embedded + self.value_projection(self._value_inputs(items, values))
        return self.embedding_dropout(embedded)

    def _value_inputs(self, items: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
        """Return (..., 2): the standardised value (0 when absent) and a 1/0 presence flag."""
        if values is None:
            values = torch.full(items.shape, float("nan"))
        present = ~torch.isnan(values)
        standardised = (values - self.value_scaling[0]) / self.value_scaling[1]
        standardised = torch.where(present, standardised, torch.zeros_like(standardised))
        return torch.stack([standardised, present.to(standardised.dtype)], dim=-1)

    def forward(
        self,
        items: torch.Tensor,  # (batch, time) int64
        event_types: torch.Tensor,  # (batch, time) int64
        state: RecurrentState | None = None,
        values: torch.Tensor | None = None,  # (batch, time) float32, NaN where absent
    ) -> tuple[torch.Tensor, RecurrentState]:
        """Run the cell over whole sequences and return per-step outputs and the final state."""
        embedded = self.embed(items, event_types, values)  # (batch, time, embedding)
        outputs, state = self.rnn(embedded, state)  # (batch, time, hidden), state of (layers, batch, hidden)
        return self.hidden_dropout(outputs), state

    def output_weights(self) -> torch.Tensor:
        """Return the (num_items, width) item matrix that scores are computed against."""
        if self.config.tied_embeddings:
            return self.item_embedding.weight
        return self.output_item_embedding.weight

    def project_outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        """Map cell outputs (..., hidden) into the space of output_weights."""
        if self.config.tied_embeddings and self.config.hidden_size != self.config.embedding_size:
            return self.output_projection(outputs)
        return outputs

    def score(self, outputs: torch.Tensor) -> torch.Tensor:
        """Score every item from cell outputs of shape (..., hidden), with -inf for index 0."""
        logits = self.project_outputs(outputs) @ self.output_weights().T + self.output_bias  # (..., items)
        return logits.masked_fill(self.unknown_item_mask, float("-inf"))

    def conversion_logits(self, outputs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Return the conversion logit of each item given cell outputs.

        ``outputs`` is (..., hidden) and ``items`` is (..., n) item indices, one set of n
        items per output row; the result is (..., n).
        """
        if not self.config.conversion_head:
            raise ValueError("The model has no conversion head; build it with conversion_head=True.")
        projected = self.conversion_projection(outputs)  # (..., embedding)
        item_vectors = self.conversion_item_embedding(items)  # (..., n, embedding)
        logits = (item_vectors * projected.unsqueeze(-2)).sum(dim=-1)  # (..., n)
        return logits + self.conversion_bias[items] + self.conversion_offset

    # -- serving path -------------------------------------------------------------------------

    def step(
        self,
        item: torch.Tensor,  # (batch,) int64
        event_type: torch.Tensor,  # (batch,) int64
        hidden: torch.Tensor,  # (layers, batch, hidden)
        exclude_items: torch.Tensor,  # (batch, n_exclude) int64, padded with 0
        k: int,
        cell: torch.Tensor | None = None,  # (layers, batch, hidden), LSTM only
        value: torch.Tensor | None = None,  # (batch,) float32, NaN where absent
    ) -> tuple[torch.Tensor, ...]:
        """Apply one event per user and return the new state and the top-k items.

        Returns (hidden_out, topk_scores, topk_items), followed by cell_out for an LSTM,
        followed by topk_conversion (batch, k), the sigmoid probability that an interaction
        with each top-k item is strong, when the model has a conversion head. The cell arithmetic is nn.GRU's or nn.LSTM's, gate order included, so a chain of
        steps reproduces ``forward``. Scores of the items in ``exclude_items`` and of index
        0 are -inf before top-k.
        """
        if self.config.has_cell_state and cell is None:
            raise ValueError("An LSTM step needs the cell state as well as the hidden state.")
        layer_input = self.embed(item, event_type, value)  # (batch, embedding)
        new_hidden, new_cell = [], []
        for layer in range(self.config.num_layers):
            if self.config.has_cell_state:
                layer_hidden, layer_cell = self._lstm_cell(layer, layer_input, hidden[layer], cell[layer])
                new_cell.append(layer_cell)
            else:
                layer_hidden = self._gru_cell(layer, layer_input, hidden[layer])  # (batch, hidden)
            new_hidden.append(layer_hidden)
            layer_input = layer_hidden
            if layer < self.config.num_layers - 1:
                layer_input = F.dropout(layer_input, self.rnn.dropout, self.training)
        hidden_out = torch.stack(new_hidden)  # (layers, batch, hidden)

        outputs = self.hidden_dropout(layer_input)  # (batch, hidden)
        scores = self.score(outputs)  # (batch, items)
        scores = scores.scatter(1, exclude_items, float("-inf"))
        topk_scores, topk_items = torch.topk(scores, k, dim=1)  # (batch, k), (batch, k)

        results = [hidden_out, topk_scores, topk_items]
        if self.config.has_cell_state:
            results.append(torch.stack(new_cell))  # (layers, batch, hidden)
        if self.config.conversion_head:
            results.append(torch.sigmoid(self.conversion_logits(outputs, topk_items)))  # (batch, k)
        return tuple(results)

    def _layer_weights(self, layer: int) -> tuple[torch.Tensor, ...]:
        return (
            getattr(self.rnn, f"weight_ih_l{layer}"),  # (gates * hidden, input)
            getattr(self.rnn, f"weight_hh_l{layer}"),  # (gates * hidden, hidden)
            getattr(self.rnn, f"bias_ih_l{layer}"),  # (gates * hidden,)
            getattr(self.rnn, f"bias_hh_l{layer}"),  # (gates * hidden,)
        )

    def _gru_cell(self, layer: int, layer_input: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        weight_ih, weight_hh, bias_ih, bias_hh = self._layer_weights(layer)
        input_gates = layer_input @ weight_ih.T + bias_ih  # (batch, 3 * hidden)
        hidden_gates = hidden @ weight_hh.T + bias_hh  # (batch, 3 * hidden)
        input_reset, input_update, input_new = input_gates.chunk(3, dim=1)  # 3 x (batch, hidden)
        hidden_reset, hidden_update, hidden_new = hidden_gates.chunk(3, dim=1)  # 3 x (batch, hidden)

        reset = torch.sigmoid(input_reset + hidden_reset)
        update = torch.sigmoid(input_update + hidden_update)
        # The reset gate scales the hidden term after its bias is added, as in nn.GRU.
        candidate = torch.tanh(input_new + reset * hidden_new)
        return (1.0 - update) * candidate + update * hidden

    def _lstm_cell(
        self, layer: int, layer_input: torch.Tensor, hidden: torch.Tensor, cell: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weight_ih, weight_hh, bias_ih, bias_hh = self._layer_weights(layer)
        gates = layer_input @ weight_ih.T + bias_ih + hidden @ weight_hh.T + bias_hh  # (batch, 4 * hidden)
        # nn.LSTM's gate order: input, forget, cell candidate, output.
        input_gate, forget_gate, candidate, output_gate = gates.chunk(4, dim=1)  # 4 x (batch, hidden)

        new_cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(candidate)
        new_hidden = torch.sigmoid(output_gate) * torch.tanh(new_cell)
        return new_hidden, new_cell
