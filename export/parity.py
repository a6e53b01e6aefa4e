"""Check that the exported step graph computes what the PyTorch model computes.

Two kinds of inputs are compared. Independent random batches have random hidden states,
items, event types, event values (some absent) and exclusion lists of several lengths. In a chain of steps, each side
feeds its own hidden (and LSTM cell) output back in, so drift would accumulate and show.
Hidden and cell states must agree within the tolerance. Scores must agree within the tolerance scaled by
max(1, |score|), because float32 rounding grows with the magnitude of a score. Top-k lists
must be equal, except that two items may swap places where their scores tie within that
scaled tolerance. Conversion probabilities (models with a conversion head) must agree
within the tolerance with PyTorch's probabilities for the items that the graph returned,
so a tie swap does not count as a difference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort
import torch

from export.model import GRU4Rec
from export.onnx_export import input_roles, output_roles

DEFAULT_TOLERANCE = 1e-5
RANDOM_BATCH_SHAPES = ((1, 0), (2, 1), (7, 5), (32, 30), (64, 200))  # (batch, n_exclude)
CHAINED_STEPS = 200
CHAINED_BATCH = 4
# The chained run excludes each user's most recent items, as the worker does.
CHAINED_EXCLUDE_WINDOW = 50
MAX_REPORTED_FAILURES = 10


class ParityError(Exception):
    """The ONNX graph and the PyTorch model disagree beyond the tolerance."""

    def __init__(self, message: str, result: ParityResult):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class ParityResult:
    """Largest differences seen and how many top-k positions differed only by a tie."""

    tolerance: float
    random_batches: int
    chained_steps: int
    hidden_max_abs_diff: float
    scores_max_abs_diff: float
    topk_positions_compared: int
    topk_tie_swaps: int
    failures: tuple[str, ...]
    # Largest difference of the top-k conversion probabilities; None without the head.
    conversion_max_abs_diff: float | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        figures = asdict(self)
        figures["failures"] = list(self.failures)
        figures["passed"] = self.passed
        return figures


class _Comparison:
    """Running maxima and failure notes over all compared steps."""

    def __init__(self, tolerance: float):
        self.tolerance = tolerance
        self.hidden_max = 0.0
        self.scores_max = 0.0
        self.conversion_max = 0.0
        self.positions = 0
        self.tie_swaps = 0
        self.failures: list[str] = []

    def fail(self, note: str) -> None:
        if len(self.failures) < MAX_REPORTED_FAILURES:
            self.failures.append(note)

    def compare(
        self,
        label: str,
        torch_outputs: dict[str, np.ndarray],
        onnx_outputs: dict[str, np.ndarray],
        full_scores: np.ndarray,
        reference_conversion: np.ndarray | None = None,
    ) -> None:
        """Compare one step's outputs, keyed by output role.

        ``reference_conversion`` is PyTorch's conversion probability of each item that the
        graph returned: (batch, k), or None for a model without the head.
        """
        torch_scores, torch_items = torch_outputs["scores"], torch_outputs["items"]
        onnx_scores, onnx_items = onnx_outputs["scores"], onnx_outputs["items"]

        # The LSTM cell state is held to the hidden state's tolerance.
        for role in ("hidden", "cell"):
            if role not in torch_outputs:
                continue
            state_diff = float(np.abs(torch_outputs[role] - onnx_outputs[role]).max())
            self.hidden_max = max(self.hidden_max, state_diff)
            if not state_diff <= self.tolerance:
                self.fail(f"{label}: {role}_out differs by {state_diff:.3g} > {self.tolerance:g}")

        if reference_conversion is not None:
            conversion_diff = float(np.abs(reference_conversion - onnx_outputs["conversion"]).max())
            self.conversion_max = max(self.conversion_max, conversion_diff)
            if not conversion_diff <= self.tolerance:
                self.fail(f"{label}: topk_conversion differs by {conversion_diff:.3g} > {self.tolerance:g}")

        scores_diff = _max_abs_diff(torch_scores, onnx_scores)
        self.scores_max = max(self.scores_max, scores_diff)
        if not _scores_close(torch_scores, onnx_scores, self.tolerance):
            self.fail(f"{label}: topk_scores differ by up to {scores_diff:.3g}, beyond {self.tolerance:g} x max(1, |score|)")

        self._compare_items(label, torch_scores, torch_items, onnx_items, full_scores)

    def _compare_items(self, label, torch_scores, torch_items, onnx_items, full_scores) -> None:
        self.positions += torch_items.size
        for row, position in zip(*np.nonzero(torch_items != onnx_items)):
            # The ONNX pick is acceptable when PyTorch scores it the same as its own pick.
            onnx_item = onnx_items[row, position]
            expected = torch_scores[row, position]
            actual = full_scores[row, onnx_item]
            if _scores_close(np.array([expected]), np.array([actual]), self.tolerance):
                self.tie_swaps += 1
                continue
            self.fail(
                f"{label}, row {row}, rank {position}: ONNX returned item {onnx_item} "
                f"(PyTorch score {actual:.7g}), PyTorch returned item {torch_items[row, position]} "
                f"(score {expected:.7g})"
            )


def _scores_close(expected: np.ndarray, actual: np.ndarray, tolerance: float) -> bool:
    """Return True when every pair agrees within tolerance x max(1, |expected|)."""
    both_equal = expected == actual  # covers -inf == -inf
    if not (both_equal | (np.isfinite(expected) & np.isfinite(actual))).all():
        return False  # an infinity or NaN facing a different value
    expected = np.where(both_equal, 0.0, expected.astype(np.float64))
    actual = np.where(both_equal, 0.0, actual.astype(np.float64))
    allowed = tolerance * np.maximum(1.0, np.abs(expected))
    return bool((np.abs(expected - actual) <= allowed).all())


def _max_abs_diff(left: np.ndarray, right: np.ndarray) -> float:
    """Largest absolute difference, counting two equal infinities as no difference."""
    both_equal = left == right  # covers -inf == -inf, whose difference would be NaN
    left = np.where(both_equal, 0.0, left.astype(np.float64))
    right = np.where(both_equal, 0.0, right.astype(np.float64))
    diff = np.abs(left - right)
    return float(diff.max()) if diff.size else 0.0


def make_session(graph_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # One thread keeps the check steady when other processes share the cores. Results do not
    # depend on the thread count beyond float rounding.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(graph_bytes, sess_options=options, providers=["CPUExecutionProvider"])


def check_parity(
    model: GRU4Rec,
    graph_bytes: bytes,
    k: int,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    chained_steps: int = CHAINED_STEPS,
) -> ParityResult:
    """Compare the graph with ``model.step`` and raise ParityError if they disagree."""
    was_training = model.training
    model.eval()
    session = make_session(graph_bytes)
    rng = np.random.default_rng(seed)
    comparison = _Comparison(tolerance)

    try:
        for index, (batch, n_exclude) in enumerate(RANDOM_BATCH_SHAPES):
            inputs = _random_inputs(model, rng, batch, n_exclude)
            label = f"random batch {index} (batch {batch}, {n_exclude} excluded)"
            torch_outputs, full_scores = _run_torch(model, inputs, k)
            onnx_outputs = _run_onnx(model, session, inputs)
            reference = _reference_conversion(model, torch_outputs, onnx_outputs)
            comparison.compare(label, torch_outputs, onnx_outputs, full_scores, reference)
        _compare_chain(model, session, rng, k, chained_steps, comparison)
    finally:
        model.train(was_training)

    result = ParityResult(
        tolerance=tolerance,
        random_batches=len(RANDOM_BATCH_SHAPES),
        chained_steps=chained_steps,
        hidden_max_abs_diff=comparison.hidden_max,
        scores_max_abs_diff=comparison.scores_max,
        topk_positions_compared=comparison.positions,
        topk_tie_swaps=comparison.tie_swaps,
        failures=tuple(comparison.failures),
        conversion_max_abs_diff=comparison.conversion_max if model.config.conversion_head else None,
    )
    if not result.passed:
        raise ParityError(
            "ONNX step graph disagrees with the PyTorch model:\n  " + "\n  ".join(result.failures), result
        )
    return result


def _random_inputs(model: GRU4Rec, rng: np.random.Generator, batch: int, n_exclude: int) -> dict[str, np.ndarray]:
    """Return random inputs keyed by graph input name."""
    config = model.config
    exclude_items = rng.integers(0, config.num_items, size=(batch, n_exclude), dtype=np.int64)
    # Zero padding must behave like any other excluded index 0.
    exclude_items[:, n_exclude // 2 :] *= rng.integers(0, 2, size=(batch, n_exclude - n_exclude // 2))
    state_shape = (config.num_layers, batch, config.hidden_size)
    values = {
        "item": rng.integers(0, config.num_items, size=batch, dtype=np.int64),
        "event_type": rng.integers(0, config.num_event_types, size=batch, dtype=np.int64),
        "hidden": rng.uniform(-1.0, 1.0, size=state_shape).astype(np.float32),
        "exclude": exclude_items,
        "cell": rng.uniform(-2.0, 2.0, size=state_shape).astype(np.float32),
        "value": _random_values(rng, batch),
    }
    return {name: values[role] for role, name in input_roles(config).items()}


def _random_values(rng: np.random.Generator, batch: int) -> np.ndarray:
    """Return ratings 1..5 with about a third absent (NaN)."""
    values = rng.integers(1, 6, size=batch).astype(np.float32)
    values[rng.random(batch) < 0.3] = np.nan
    return values


def _run_onnx(model: GRU4Rec, session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the graph and return its outputs keyed by output role."""
    roles = output_roles(model.config)
    values = session.run(list(roles.values()), inputs)
    return dict(zip(roles, values))


def _reference_conversion(
    model: GRU4Rec, torch_outputs: dict[str, np.ndarray], onnx_outputs: dict[str, np.ndarray]
) -> np.ndarray | None:
    """Return PyTorch's conversion probabilities for the items the graph returned: (batch, k)."""
    if not model.config.conversion_head:
        return None
    # In eval mode the head reads the last layer's new hidden state unchanged.
    last_hidden = torch.from_numpy(torch_outputs["hidden"][-1])  # (batch, hidden)
    with torch.no_grad():
        logits = model.conversion_logits(last_hidden, torch.from_numpy(onnx_outputs["items"]))  # (batch, k)
    return torch.sigmoid(logits).numpy()


def _run_torch(model: GRU4Rec, inputs: dict[str, np.ndarray], k: int):
    """Return the PyTorch step outputs keyed by output role, and the full masked score matrix (batch, items)."""
    tensors = {role: torch.from_numpy(inputs[name]) for role, name in input_roles(model.config).items()}
    args = (tensors["item"], tensors["event_type"], tensors["hidden"], tensors["exclude"])
    options = {"cell": tensors.get("cell"), "value": tensors.get("value")}
    with torch.no_grad():
        step_outputs = model.step(*args, k, **options)
        torch_outputs = {role: tensor.numpy() for role, tensor in zip(output_roles(model.config), step_outputs)}
        # Ranking every known item recovers each item's masked score for the tie check.
        all_scores, all_items = model.step(*args, model.config.num_items - 1, **options)[1:3]
    full_scores = np.full((len(tensors["item"]), model.config.num_items), -np.inf, dtype=np.float32)
    np.put_along_axis(full_scores, all_items.numpy(), all_scores.numpy(), axis=1)
    return torch_outputs, full_scores


def _compare_chain(
    model: GRU4Rec,
    session: ort.InferenceSession,
    rng: np.random.Generator,
    k: int,
    steps: int,
    comparison: _Comparison,
) -> None:
    config = model.config
    names = input_roles(config)
    zeros = np.zeros((config.num_layers, CHAINED_BATCH, config.hidden_size), dtype=np.float32)
    torch_state = {"hidden": zeros, "cell": zeros.copy()}
    onnx_state = {"hidden": zeros.copy(), "cell": zeros.copy()}
    history = np.zeros((CHAINED_BATCH, 0), dtype=np.int64)

    for step in range(steps):
        items = rng.integers(0, config.num_items, size=CHAINED_BATCH, dtype=np.int64)
        history = np.concatenate([history, items[:, None]], axis=1)[:, -CHAINED_EXCLUDE_WINDOW:]
        events = {
            "item": items,
            "event_type": rng.integers(0, config.num_event_types, size=CHAINED_BATCH, dtype=np.int64),
            "exclude": history,
            "value": _random_values(rng, CHAINED_BATCH),
        }

        torch_inputs = {name: {**events, **torch_state}[role] for role, name in names.items()}
        onnx_inputs = {name: {**events, **onnx_state}[role] for role, name in names.items()}
        torch_outputs, full_scores = _run_torch(model, torch_inputs, k)
        onnx_outputs = _run_onnx(model, session, onnx_inputs)
        reference = _reference_conversion(model, torch_outputs, onnx_outputs)

        comparison.compare(f"chained step {step}", torch_outputs, onnx_outputs, full_scores, reference)
        torch_state = {"hidden": torch_outputs["hidden"], "cell": torch_outputs.get("cell")}
        onnx_state = {"hidden": onnx_outputs["hidden"], "cell": onnx_outputs.get("cell")}
