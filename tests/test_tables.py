"""Tests of tables.py: DataFrames built a block of rows at a time."""

from __future__ import annotations

import pandas as pd

from irv2_pipeline.tables import ROWS_PER_BLOCK, frame_from_rows


def test_rows_over_several_blocks_make_the_same_table_as_pandas():
    rows = [(f"cat/{i}.jpg", i, i % 3 == 0) for i in range(2 * ROWS_PER_BLOCK + 5)]
    columns = ["path", "width", "flag"]

    table = frame_from_rows(iter(rows), columns)

    pd.testing.assert_frame_equal(table, pd.DataFrame(rows, columns=columns))


def test_no_rows_give_an_empty_table_with_the_columns():
    table = frame_from_rows(iter([]), ["path", "label"])
    assert table.empty
    assert list(table.columns) == ["path", "label"]
