import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_lpreg.data import DataError, DataFields, PromptDataset, PromptRecord, load_prompt_dataset

MSG = [{"role": "user", "content": "What is 1 + 1?"}]


def verl_row(prompt=None, source="math_dapo", gt="2"):
    return {
        "data_source": source,
        "prompt": MSG if prompt is None else prompt,
        "ability": "math",
        "reward_model": {"ground_truth": gt, "style": "rule"},
        "extra_info": {"index": 0},
    }


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


# ---------------------------------------------------------------- loading


def test_jsonl_message_and_string_prompts(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [
        verl_row(),
        verl_row(prompt="Compute 6 * 7.", source="gsm", gt="42"),
    ])
    ds = load_prompt_dataset(path)
    assert len(ds) == 2 and ds.skipped == 0
    # verl's extra_info column travels with the record (a custom reward function gets it).
    assert ds[0] == PromptRecord(0, MSG, "math_dapo", "2", {"index": 0})
    assert ds[1] == PromptRecord(1, "Compute 6 * 7.", "gsm", "42", {"index": 0})
    assert ds[0].question == "What is 1 + 1?"
    assert ds[1].messages() == [{"role": "user", "content": "Compute 6 * 7."}]


def test_parquet_verl_nested_schema(tmp_path):
    rows = [
        verl_row(),
        verl_row(prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q2"}], gt="7"),
    ]
    path = write_parquet(tmp_path / "train.parquet", rows)
    # The nested struct really is a struct column, as in verl's parquet files.
    assert pa.types.is_struct(pq.read_schema(path).field("reward_model").type)
    ds = PromptDataset(path)
    assert [r.ground_truth for r in ds] == ["2", "7"]
    assert ds[1].extra_info == {"index": 0}
    assert ds[0].prompt == MSG
    assert ds[1].prompt[0] == {"role": "system", "content": "Be brief."}
    assert ds[1].question == "Q2"


def test_parquet_string_prompt(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", [verl_row(prompt="plain question", gt="5")])
    (rec,) = PromptDataset(path)
    assert rec.prompt == "plain question" and rec.ground_truth == "5"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_flat_dotted_column(tmp_path, fmt):
    row = {"prompt": "Q", "data_source": "s", "reward_model.ground_truth": "9"}
    path = (write_jsonl if fmt == "jsonl" else write_parquet)(tmp_path / f"flat.{fmt}", [row])
    (rec,) = PromptDataset(path)
    assert rec.ground_truth == "9"


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_custom_field_names(tmp_path, fmt):
    rows = [{"question": "Q1", "src": "aime24", "meta": {"answer": "10"}},
            {"question": "Q2", "src": "aime25", "meta": {"answer": "11"}}]
    path = (write_jsonl if fmt == "jsonl" else write_parquet)(tmp_path / f"c.{fmt}", rows)
    fields = DataFields(prompt="question", data_source="src", ground_truth="meta.answer")
    ds = PromptDataset(path, fields=fields)
    assert [(r.prompt, r.data_source, r.ground_truth) for r in ds] == [("Q1", "aime24", "10"), ("Q2", "aime25", "11")]
    # The default field names do not fit this file.
    with pytest.raises(DataError, match="'prompt'"):
        PromptDataset(path)


@pytest.mark.parametrize("gt, expected", [
    (34, "34"), (2.5, "2.5"), (34.0, "34"), (["x+1"], "x+1"), ([3], "3"), ("\\frac{1}{2}", "\\frac{1}{2}"),
])
def test_ground_truth_conversion(tmp_path, gt, expected):
    path = write_jsonl(tmp_path / "gt.jsonl", [verl_row(gt=gt)])
    assert PromptDataset(path)[0].ground_truth == expected


def test_multiple_files_blank_lines_and_max_samples(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [verl_row(gt="1"), "", verl_row(gt="2")])
    b = write_parquet(tmp_path / "b.parquet", [verl_row(gt="3")])
    ds = PromptDataset([a, b])
    assert [r.ground_truth for r in ds] == ["1", "2", "3"]
    assert [r.index for r in ds] == [0, 1, 2]
    assert len(PromptDataset([a, b], max_samples=2)) == 2


def test_unknown_extension(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text('{"prompt": "q", "data_source": "s", "reward_model": {"ground_truth": "1"}}\n')
    with pytest.raises(ValueError, match="format"):
        PromptDataset(str(path))
    assert len(PromptDataset(str(path), format="jsonl")) == 1


# ---------------------------------------------------------------- errors

GOOD = json.dumps(verl_row())

JSONL_BAD_ROWS = {
    "invalid_json": ('{"prompt": "Q", "data_source": ', None, "invalid JSON"),
    "not_an_object": ("[1, 2, 3]", None, "expected a JSON object"),
    "missing_prompt": ({"data_source": "s", "reward_model": {"ground_truth": "1"}}, "prompt", "missing"),
    "null_prompt": ({"prompt": None, "data_source": "s", "reward_model": {"ground_truth": "1"}}, "prompt", "null"),
    "missing_data_source": ({"prompt": "Q", "reward_model": {"ground_truth": "1"}}, "data_source", "missing"),
    "missing_nested_gt": ({"prompt": "Q", "data_source": "s", "reward_model": {"style": "rule"}},
                          "reward_model.ground_truth", "missing"),
    "missing_reward_model": ({"prompt": "Q", "data_source": "s"}, "reward_model.ground_truth", "missing"),
    "data_source_int": (verl_row(source=3), "data_source", "expected a string"),
    "prompt_int": (verl_row(prompt=5), "prompt", "expected a string or a list"),
    "empty_prompt": (verl_row(prompt="   "), "prompt", "empty prompt"),
    "empty_messages": (verl_row(prompt=[]), "prompt", "empty prompt"),
    "empty_contents": (verl_row(prompt=[{"role": "user", "content": ""}]), "prompt", "empty prompt"),
    "message_no_content": (verl_row(prompt=[{"role": "user"}]), "prompt", "content"),
    "message_not_dict": (verl_row(prompt=["hello"]), "prompt", "message 0"),
    "no_user_message": (verl_row(prompt=[{"role": "system", "content": "x"}]), "prompt", "no 'user'"),
    "gt_two_elements": (verl_row(gt=["1", "2"]), "reward_model.ground_truth", "2 elements"),
    "gt_empty_list": (verl_row(gt=[]), "reward_model.ground_truth", "0 elements"),
    "gt_bool": (verl_row(gt=True), "reward_model.ground_truth", "bool"),
    "gt_dict": (verl_row(gt={"a": 1}), "reward_model.ground_truth", "dict"),
    "gt_empty": (verl_row(gt=""), "reward_model.ground_truth", "empty"),
    "extra_info_list": ({**verl_row(), "extra_info": [1]}, "extra_info", "expected a mapping"),
}


@pytest.mark.parametrize("case", sorted(JSONL_BAD_ROWS))
def test_jsonl_error_names_file_line_field(tmp_path, case):
    bad, field, reason = JSONL_BAD_ROWS[case]
    # Good row, blank line, good row, bad row: the bad row is physical line 4.
    path = write_jsonl(tmp_path / f"{case}.jsonl", [GOOD, "", GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        PromptDataset(path)
    err = info.value
    msg = str(err)
    assert path in msg
    assert "line 4" in msg
    assert reason in msg
    assert err.row == "line 4" and err.path == path and err.field == field
    if field is not None:
        assert f"field {field!r}" in msg


def test_parquet_error_names_file_row_field(tmp_path):
    # One parquet column holds one type: string prompts throughout.
    rows = [verl_row(prompt="Q0"), verl_row(prompt="Q1"), verl_row(prompt=""), verl_row(prompt="Q3")]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError) as info:
        PromptDataset(path)
    msg = str(info.value)
    assert path in msg and "row 2" in msg and "field 'prompt'" in msg and "empty prompt" in msg


def test_parquet_null_nested_field(tmp_path):
    rows = [verl_row(), {"prompt": MSG, "data_source": "s", "reward_model": {"style": "rule"}}]
    path = write_parquet(tmp_path / "null.parquet", rows)
    with pytest.raises(DataError) as info:
        PromptDataset(path)
    msg = str(info.value)
    assert path in msg and "row 1" in msg and "field 'reward_model.ground_truth'" in msg


def test_parquet_wrong_type_column(tmp_path):
    rows = [verl_row(source=1), verl_row(source=2)]
    path = write_parquet(tmp_path / "int_source.parquet", rows)
    with pytest.raises(DataError) as info:
        PromptDataset(path)
    msg = str(info.value)
    assert path in msg and "row 0" in msg and "field 'data_source'" in msg and "int" in msg


def test_skip_mode_counts_and_reasons(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        verl_row(gt="1"),
        "{not json",
        verl_row(gt="2"),
        verl_row(prompt=""),
        verl_row(gt=["a", "b"]),
        verl_row(gt="3"),
    ])
    ds = PromptDataset(path, on_error="skip")
    assert [r.ground_truth for r in ds] == ["1", "2", "3"]
    assert [r.index for r in ds] == [0, 1, 2]
    assert ds.skipped == 3
    assert "line 2" in ds.skip_reasons[0] and "invalid JSON" in ds.skip_reasons[0]
    assert "line 4" in ds.skip_reasons[1] and "'prompt'" in ds.skip_reasons[1]
    assert "line 5" in ds.skip_reasons[2] and "'reward_model.ground_truth'" in ds.skip_reasons[2]
    assert all(path in r for r in ds.skip_reasons)
    # The same file in raise mode stops at the first bad row.
    with pytest.raises(DataError, match="line 2"):
        PromptDataset(path)


def test_skip_mode_parquet(tmp_path):
    path = write_parquet(tmp_path / "s.parquet", [verl_row(prompt="a"), verl_row(prompt=" "), verl_row(prompt="c")])
    ds = PromptDataset(path, on_error="skip")
    assert len(ds) == 2 and ds.skipped == 1 and "row 1" in ds.skip_reasons[0]


def test_bad_on_error_value(tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", [verl_row()])
    with pytest.raises(ValueError, match="on_error"):
        PromptDataset(path, on_error="ignore")
