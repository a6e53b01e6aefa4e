"""Format 3 model bundles: the conversion output, the heads section and the categories file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from worker_bundle_helpers import HIDDEN_SIZE, ConstantBundle

from worker.model import BundleError, load_bundle

pytestmark = pytest.mark.multi_objective

LOGITS = {"i1": 3.0, "i2": 2.5, "i3": 2.0, "i4": 1.0}
CONVERSION = {"i1": 0.1, "i2": 0.2, "i3": 0.9, "i4": 0.4}


def step_once(model, exclude: list[list[int]]):
    batch = len(exclude)
    return model.step(
        np.ones(batch, dtype=np.int64),
        np.zeros(batch, dtype=np.int64),
        np.zeros((1, batch, HIDDEN_SIZE), dtype=np.float32),
        np.array(exclude, dtype=np.int64),
    )


def test_format_3_conversion_output_follows_items(tmp_path):
    model = load_bundle(ConstantBundle(LOGITS, conversion=CONVERSION, k=3).write(tmp_path))

    output = step_once(model, [[0], [1]])

    assert model.has_conversion
    assert output.conversion.shape == (2, 3)
    assert output.conversion.dtype == np.float32
    expected = [[CONVERSION[model.item_ids[index]] for index in row] for row in output.items.tolist()]
    np.testing.assert_allclose(output.conversion, expected, rtol=1e-6)


def test_format_3_without_head_has_no_conversion(tmp_path):
    model = load_bundle(ConstantBundle(LOGITS).write(tmp_path))

    output = step_once(model, [[0]])

    assert not model.has_conversion
    assert output.conversion is None


def test_format_2_bundle_still_loads(tmp_path):
    model = load_bundle(ConstantBundle(LOGITS, format_version=2).write(tmp_path))

    output = step_once(model, [[0]])

    assert not model.has_conversion
    assert not model.has_categories
    assert output.items.tolist() == [[1, 2, 3, 4]]


def test_categories_file_read_by_item_index(tmp_path):
    categories = {"i1": ["Drama", "Comedy"], "i3": ["Drama"]}
    model = load_bundle(ConstantBundle(LOGITS, categories=categories).write(tmp_path))

    assert model.has_categories
    assert model.categories[model.item_index["i1"]] == frozenset({"Drama", "Comedy"})
    assert model.categories[model.item_index["i2"]] == frozenset()
    assert model.categories[model.item_index["i3"]] == frozenset({"Drama"})
    assert model.categories[0] == frozenset()
    assert len(model.categories) == len(model.item_ids)


def test_bundle_without_categories_has_empty_ones(tmp_path):
    model = load_bundle(ConstantBundle(LOGITS).write(tmp_path))

    assert not model.has_categories
    assert model.categories == [frozenset()] * len(model.item_ids)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"heads": None}, 'format 3 needs a "heads" object'),
        ({"heads": {"conversion": {"output": "conversion"}}}, 'at least a "preference" head'),
        ({"heads": {"preference": {"output": "logits"}}}, "head 'preference' names the output role 'logits'"),
        ({"heads": {"preference": {"output": "scores"}, "conversion": {"output": "conversion"}}}, "head 'conversion' names the output role"),
        ({"format_version": 4}, "format_version 4 is not supported"),
    ],
)
def test_inconsistent_heads_rejected(tmp_path, changes, expected):
    bundle = ConstantBundle(LOGITS, manifest_changes=changes)

    with pytest.raises(BundleError, match="manifest.json") as caught:
        load_bundle(bundle.write(tmp_path))

    assert expected in str(caught.value)


def test_conversion_output_without_head_rejected(tmp_path):
    bundle = ConstantBundle(LOGITS, conversion=CONVERSION, manifest_changes={"heads": {"preference": {"output": "scores"}}})

    with pytest.raises(BundleError, match="heads lacks a conversion head but outputs has the conversion role"):
        load_bundle(bundle.write(tmp_path))


def test_format_2_with_conversion_rejected(tmp_path):
    bundle = ConstantBundle(LOGITS, conversion=CONVERSION)
    bundle_dir = bundle.write(tmp_path)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["format_version"] = 2
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(BundleError, match="only format 3 carries the conversion head"):
        load_bundle(bundle_dir)


def test_conversion_output_of_wrong_width_rejected(tmp_path):
    bundle_dir = ConstantBundle(LOGITS, conversion=CONVERSION, k=3).write(tmp_path)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["k"] = 2
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(BundleError, match="output conversion='topk_conversion' has shape"):
        load_bundle(bundle_dir)


CATEGORY_ROWS = ["1\ti1\tDrama", "2\ti2\t", "3\ti3\tComedy|Drama", "4\ti4\t"]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["index\titem_id\tgenres"] + CATEGORY_ROWS, "expected the header"),
        ([], "expected the header"),
        (["index\titem_id\tcategories"] + CATEGORY_ROWS[:3], "3 rows, but items.tsv has 4 items"),
        (["index\titem_id\tcategories"] + CATEGORY_ROWS + ["5\ti5\t"], ":6: expected no more rows"),
        (["index\titem_id\tcategories", "2\ti2\t"] + CATEGORY_ROWS[1:], ":2: expected index 1 item 'i1'"),
        (["index\titem_id\tcategories", "1\ti9\tDrama"] + CATEGORY_ROWS[1:], ":2: expected index 1 item 'i1'"),
        (["index\titem_id\tcategories", "1\ti1"] + CATEGORY_ROWS[1:], ":2: expected 3 tab-separated columns, got 2"),
        (["index\titem_id\tcategories", "1\ti1\tDrama||Comedy"] + CATEGORY_ROWS[1:], ":2: invalid categories 'Drama||Comedy'"),
    ],
)
def test_malformed_categories_file_rejected(tmp_path, lines, expected):
    bundle_dir = ConstantBundle(LOGITS, categories={"i1": ["Drama"]}).write(tmp_path)
    (bundle_dir / "categories.tsv").write_text("\n".join(lines) + "\n")

    with pytest.raises(BundleError, match="categories.tsv") as caught:
        load_bundle(bundle_dir)

    assert expected in str(caught.value)


def test_missing_categories_file_rejected(tmp_path):
    bundle_dir = ConstantBundle(LOGITS, categories={"i1": ["Drama"]}).write(tmp_path)
    (bundle_dir / "categories.tsv").unlink()

    with pytest.raises(BundleError, match="item categories not found"):
        load_bundle(bundle_dir)
