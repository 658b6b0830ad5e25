"""Reading landing files: text encodings (errors that say where) and a day read whole.

A byte that is not valid in the feed's encoding rejects the day with the file, line and
byte offset and the spec setting to change; `encoding:` reads other encodings. Reading a
day keeps every value and row of every file, however the frames are put together.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from mlops import ingest, labels, validation
from mlops.spec import FileFeed, load_spec
from tests.conftest import QUIET, embedded_spec_text, make_project, small_data

DAY = dt.date(2026, 1, 1)
HEADER = "timestamp,machine_id,machine_type,firmware,temperature,vibration,pressure,rpm,voltage\n"
ROWS = [
    "2026-01-01T00:00:00,Mé-01,A,1.0,60.5,1.2,100.0,1500,220\n",
    "2026-01-01T01:00:00,Mü-02,B,1.1,61.5,1.3,101.0,1510,221\n",
    "2026-01-01T02:00:00,Mø-03,C,2.0,62.5,1.4,102.0,1520,222\n",
]
LATIN1_CSV = (HEADER + "".join(ROWS)).encode("latin-1")
# The first byte that is not UTF-8: the é of line 2 (the first data row).
FIRST_BAD = len(HEADER) + len("2026-01-01T00:00:00,M")


def _feed(fmt: str = "csv", encoding: str = "utf-8") -> FileFeed:
    return FileFeed(
        path="landing",
        format=fmt,
        file_pattern=f"x_{{date}}_*.{fmt}",
        timestamp_column="timestamp",
        encoding=encoding,
    )


def _land(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


# --- 8. encodings -----------------------------------------------------------------------


def test_latin1_csv_as_utf8_names_file_line_byte_offset_and_setting(tmp_path: Path) -> None:
    path = _land(tmp_path, "x_2026-01-01_0.csv", LATIN1_CSV)
    with pytest.raises(ingest.LandingError) as err:
        ingest.load_day(_feed(), tmp_path, DAY)
    msg = str(err.value)
    assert str(path) in msg
    assert "not valid utf-8" in msg
    assert f"line 2, byte offset {FIRST_BAD}" in msg
    assert "b'\\xe9'" in msg
    assert "source.encoding: latin-1" in msg


def test_latin1_csv_with_encoding_latin1_reads_the_right_characters(tmp_path: Path) -> None:
    _land(tmp_path, "x_2026-01-01_0.csv", LATIN1_CSV)
    batch = ingest.load_day(_feed(encoding="latin-1"), tmp_path, DAY)
    assert batch.frame["machine_id"].to_list() == ["Mé-01", "Mü-02", "Mø-03"]
    assert batch.frame[ingest.ROW_NUMBER].to_list() == [1, 2, 3]
    assert batch.file_rows == {"x_2026-01-01_0.csv": 3}
    # The data version is over the bytes as they landed, not the transcoded copy.
    assert batch.content_hash == ingest.content_hash(batch.files)


def test_latin1_jsonl_as_utf8_is_located_and_read_with_encoding(tmp_path: Path) -> None:
    lines = [{"timestamp": "2026-01-01T00:00:00", "m": "ok"}, {"timestamp": "t", "m": "Mé"}]
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode("latin-1")
    path = _land(tmp_path, "x_2026-01-01_0.jsonl", data)
    offset = data.index(b"\xe9")
    with pytest.raises(ingest.LandingError) as err:
        ingest.read_file(path, "jsonl")
    assert f"{path} is not valid utf-8" in str(err.value)
    assert f"line 2, byte offset {offset}" in str(err.value)
    frame = ingest.load_day(_feed("jsonl", "latin-1"), tmp_path, DAY).frame
    assert frame["m"].to_list() == ["ok", "Mé"]


def test_parquet_ignores_encoding(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    pl.DataFrame({"m": ["Mé", "x"], "v": [1, 2]}).write_parquet(tmp_path / "x_2026-01-01_0.parquet")
    frame = ingest.load_day(_feed("parquet", "latin-1"), tmp_path, DAY).frame
    assert frame["m"].to_list() == ["Mé", "x"]
    assert frame["v"].to_list() == ["1", "2"]


@pytest.mark.parametrize(
    ("encoding", "text", "bad"),
    [
        ("utf-8", "é€日本\n" * 7, b"\xff"),  # multi-byte sequences across every chunk edge
        ("shift_jis", "日本語\n" * 7, b"\x81\x20"),  # a lead byte with an invalid trail
        ("utf-16-le", "ab\n" * 7, b"\x00\xdc"),  # a lone low surrogate
    ],
    ids=["utf-8", "shift_jis", "utf-16-le"],
)
def test_bad_byte_offset_is_exact_across_chunk_edges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoding: str, text: str, bad: bytes
) -> None:
    monkeypatch.setattr(ingest, "CHUNK", 3)
    good = text.encode(encoding)
    path = _land(tmp_path, "x_2026-01-01_0.csv", good + bad + "z\n".encode(encoding))
    with pytest.raises(ingest.LandingError) as err:
        ingest.read_file(path, "csv", encoding)
    assert f"line 8, byte offset {len(good)}" in str(err.value), str(err.value)


def test_utf16_csv_is_transcoded(tmp_path: Path) -> None:
    path = _land(tmp_path, "x_2026-01-01_0.csv", "a,b\n日本,é\n".encode("utf-16"))
    frame = ingest.read_file(path, "csv", "utf-16")
    assert frame.select("a", "b").rows() == [("日本", "é")]


def _raw_data_run(p, raise_on_error: bool = False) -> dg.ExecuteInProcessResult:
    job = p.defs.resolve_job_def("machine_failure_data_job")
    return job.execute_in_process(
        partition_key=DAY.isoformat(),
        instance=p.instance,
        run_config=QUIET,
        asset_selection=[dg.AssetKey(["machine_failure", "raw_data"])],
        raise_on_error=raise_on_error,
    )


def test_raw_data_rejects_a_latin1_day_and_keeps_the_partition_it_had(tmp_path: Path) -> None:
    p = make_project(tmp_path)
    folder = p.spec.landing_dir
    utf8 = (HEADER + "".join(ROWS)).encode("utf-8")
    _land(folder, "readings_2026-01-01.csv", utf8)
    assert _raw_data_run(p).success
    before = p.lake.content_hash("machine_failure", "raw_data", DAY.isoformat())
    _land(folder, "readings_2026-01-01.csv", LATIN1_CSV)  # the day lands again, in latin-1
    result = _raw_data_run(p)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    cause = failure.step_failure_data.error.cause  # the asset raises the LandingError
    assert cause.cls_name == "LandingError"
    msg = cause.message
    assert "readings_2026-01-01.csv is not valid utf-8" in msg
    assert f"line 2, byte offset {FIRST_BAD}" in msg
    assert "source.encoding" in msg
    # Nothing half-written: the partition is the one it was, and no temporary file is left.
    assert p.lake.content_hash("machine_failure", "raw_data", DAY.isoformat()) == before
    part_dir = Path(p.lake.path("machine_failure", "raw_data", DAY.isoformat())).parent
    assert sorted(f.name for f in part_dir.iterdir()) == [f"{DAY.isoformat()}.parquet"]


def test_raw_data_reads_a_latin1_day_with_source_encoding(tmp_path: Path) -> None:
    text = embedded_spec_text(
        ("  start_date: 2026-01-01\n", "  start_date: 2026-01-01\n  encoding: latin-1\n")
    )
    p = make_project(tmp_path, text)
    _land(p.spec.landing_dir, "readings_2026-01-01.csv", LATIN1_CSV)
    assert _raw_data_run(p, raise_on_error=True).success
    raw = p.lake.read("machine_failure", "raw_data", DAY.isoformat())
    assert raw["machine_id"].to_list() == ["Mé-01", "Mü-02", "Mø-03"]


def test_label_events_use_their_own_encoding_setting(tmp_path: Path) -> None:
    events = "failure_time,machine_id\n2026-01-01T05:00:00,Mé-01\n".encode("latin-1")
    for encoding in ("", "    encoding: latin-1\n"):
        root = tmp_path / (encoding.strip() or "default")
        text = embedded_spec_text(
            ("    entity_column: machine_id\n", f"    entity_column: machine_id\n{encoding}")
        )
        (root / "specs").mkdir(parents=True)
        (root / "specs" / "s.yaml").write_text(text)
        spec = load_spec(root / "specs" / "s.yaml")
        _land(spec.resolve(spec.labels.events.path), "failures_2026-01-01.csv", events)
        if not encoding:
            with pytest.raises(ingest.LandingError, match=r"labels\.events\.encoding: latin-1"):
                labels.load_events(spec, DAY)
        else:
            batch = labels.load_events(spec, DAY)
            assert batch.events["machine_id"].to_list() == ["Mé-01"]


# --- 9. a day read whole ------------------------------------------------------------------


def test_multi_file_day_keeps_every_value_row_and_column(tmp_path: Path) -> None:
    """Three files with different columns, empty strings, missing values, quotes and long
    values: the day's frame is every row of every file, value for value."""
    files = {
        "x_2026-01-01_a.csv": 'id,name,v\n1,alpha,1.5\n2,"with, comma",\n3,,2.5\n',
        "x_2026-01-01_b.csv": 'id,v,extra\n4,"",e1\n5,9.75,' + "L" * 200 + "\n",
        "x_2026-01-01_c.csv": "name,id\nzed,6\n",
    }
    for name, body in files.items():
        _land(tmp_path, name, body.encode())
    _land(tmp_path, "x_2026-01-01_d.csv", b"id,name\n")  # a header, no rows
    batch = ingest.load_day(_feed(), tmp_path, DAY)
    frame = batch.frame
    assert frame.height == 6
    assert batch.file_rows == {
        "x_2026-01-01_a.csv": 3,
        "x_2026-01-01_b.csv": 2,
        "x_2026-01-01_c.csv": 1,
        "x_2026-01-01_d.csv": 0,
    }
    assert frame.schema[ingest.ROW_NUMBER] == pl.Int64
    assert all(frame.schema[c] == pl.String for c in ("id", "name", "v", "extra"))
    got = frame.select(
        "id", "name", "v", "extra", ingest.SOURCE_FILE, ingest.ROW_NUMBER, ingest.FILE_COLUMNS
    ).rows()
    a, b, c = "x_2026-01-01_a.csv", "x_2026-01-01_b.csv", "x_2026-01-01_c.csv"
    assert got == [
        ("1", "alpha", "1.5", None, a, 1, "id,name,v"),
        ("2", "with, comma", None, None, a, 2, "id,name,v"),
        ("3", None, "2.5", None, a, 3, "id,name,v"),
        ("4", None, "", "e1", b, 1, "id,v,extra"),
        ("5", None, "9.75", "L" * 200, b, 2, "id,v,extra"),
        ("6", "zed", None, None, c, 1, "name,id"),
    ]


def test_content_hash_streams_the_same_digest(tmp_path: Path, monkeypatch) -> None:
    """The day's data version is unchanged by hashing in chunks (a file larger than one)."""
    big = _land(tmp_path, "x_2026-01-01_b.csv", b"id\n" + b"1234567\n" * 300_000)
    small = _land(tmp_path, "x_2026-01-01_a.csv", b"id\n1\n")
    expected = hashlib.sha256()
    for p in (small, big):
        expected.update(p.name.encode() + b"\0")
        expected.update(hashlib.sha256(p.read_bytes()).digest())
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read whole"))
    assert ingest.content_hash([big, small]) == expected.hexdigest()


def test_validation_in_batches_matches_one_batch(project, monkeypatch) -> None:
    """pandera checks rows a batch at a time and duplicates are found across batches: the
    same valid rows, in the same order, and the same quarantine as checking all at once."""
    small_data(project, days=1, machines=12, bad_rows=0.08)
    spec = project.spec
    raw = ingest.load_day(spec.source, spec.landing_dir, spec.source.start_date).frame
    results = []
    for rows in (10**9, 7):
        monkeypatch.setattr(validation, "RULES_BATCH_ROWS", rows)
        results.append(validation.validate(spec, raw, spec.source.start_date))
    whole, batched = results
    assert {"duplicate", "min", "max", "category", "not_null", "type"} <= set(whole.reasons())
    assert batched.valid.equals(whole.valid)
    assert batched.quarantine.equals(whole.quarantine)
    assert whole.rows_valid + whole.rows_quarantined == raw.height
