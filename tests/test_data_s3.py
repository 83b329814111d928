"""The same CoIN files read from moto's S3 server on loopback give identical records and images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import storage
from pipeline.data.coin import CoinSource, DataError, iter_decoded, load_records
from stages.datasets import read_dataset
from tests.s3_server import FAKE_SECRET, FaultyProxy, s3_env, s3_server, upload_tree  # noqa: F401 (fixtures)
from tests.helpers import FILES, write_coin_layout

SPLITS = [(task_file.split("/")[0], "train" if task_file.endswith("train.json") else "test") for task_file in FILES]


@pytest.fixture
def both(tmp_path: Path, s3_env: str, s3_server: str) -> tuple[CoinSource, CoinSource]:
    """The hand-made layout on disk and the same tree uploaded to s3://<bucket>/coin."""
    local = write_coin_layout(tmp_path)
    upload_tree(tmp_path, s3_env, "coin", s3_server)
    remote = CoinSource(f"s3://{s3_env}/coin/Instructions_Original", f"s3://{s3_env}/coin/images")
    return local, remote


def test_resolve_uses_endpoint_from_env(s3_env: str, s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fs, path = storage.resolve(f"s3://{s3_env}/coin/")
    assert path == f"{s3_env}/coin"
    assert fs.client_kwargs["endpoint_url"] == s3_server
    monkeypatch.delenv("S3_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    fs2, _ = storage.resolve(f"s3://{s3_env}/coin")
    assert fs2.client_kwargs["endpoint_url"] == s3_server
    fs2.pipe_file(f"{s3_env}/x/a.json", b'{"k": [1]}')
    assert storage.read_json(fs2, f"{s3_env}/x/a.json") == {"k": [1]}
    assert storage.list_files(fs2, f"{s3_env}/x") == {"a.json"}
    assert storage.display(fs2, f"{s3_env}/x/a.json") == f"s3://{s3_env}/x/a.json"


def test_s3_records_identical_to_local(both: tuple[CoinSource, CoinSource]) -> None:
    local, remote = both
    for task, split in SPLITS:
        a, b = load_records(local, task, split), load_records(remote, task, split)
        assert b.rows == a.rows, (task, split)
        assert b.file.startswith("s3://") and b.file.endswith(a.file[len(local.instructions_root):])


def test_s3_decoded_images_identical_to_local(both: tuple[CoinSource, CoinSource]) -> None:
    local, remote = both
    a = list(iter_decoded(local, "ScienceQA", "train", 8))
    b = list(iter_decoded(remote, "ScienceQA", "train", 8))
    assert [r["id"] for r in b] == [r["id"] for r in a]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_s3_read_dataset_with_ray(ray_session, both: tuple[CoinSource, CoinSource]) -> None:
    """Ray workers decode from S3 with the driver's settings (they travel in the filesystem)."""
    local, remote = both
    ds, result = read_dataset(remote, "Grounding", "test", image_size=6, decode_num_cpus=0.5)
    (row,) = ds.take_all()
    (want,) = iter_decoded(local, "Grounding", "test", 6)
    assert row["id"] == want["id"] == "r1" and list(row["size"]) == [16, 12]
    np.testing.assert_array_equal(row["image"], want["image"])


def test_s3_errors_name_the_url_and_never_the_secret(both: tuple[CoinSource, CoinSource], s3_env: str) -> None:
    _, remote = both
    with pytest.raises(DataError) as info:
        load_records(remote, "GQA", "train")
    assert str(info.value) == f"s3://{s3_env}/coin/Instructions_Original/GQA/train.json: file not found"
    bad_images = CoinSource(remote.instructions_root, f"s3://{s3_env}/elsewhere")
    with pytest.raises(DataError) as info:
        load_records(bad_images, "ScienceQA", "train")
    assert info.value.field == "image" and info.value.index == 0
    for message in (str(info.value), repr(info.value), repr(storage.resolve(remote.image_root)[0])):
        assert FAKE_SECRET not in message


# ---- the object store failing --------------------------------------------------------------------
@pytest.fixture
def flaky(tmp_path: Path, s3_env: str, s3_server: str, monkeypatch: pytest.MonkeyPatch):
    """The layout uploaded to the S3 server, read through a ``FaultyProxy`` in front of it, with at
    most 3 attempts per request (``S3_MAX_ATTEMPTS``); yields (local source, remote source, proxy)."""
    local = write_coin_layout(tmp_path)
    upload_tree(tmp_path, s3_env, "coin", s3_server)
    proxy = FaultyProxy(s3_server)
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("S3_MAX_ATTEMPTS", "3")
    remote = CoinSource(f"s3://{s3_env}/coin/Instructions_Original", f"s3://{s3_env}/coin/images")
    yield local, remote, proxy
    proxy.close()


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_transient_store_failures_are_retried(flaky, mode: str) -> None:
    """Two failed requests for the instructions file and two for an image (503 SlowDown, or the
    connection dropped): the retries read everything, identical to the local files."""
    local, remote, proxy = flaky
    proxy.fail("ScienceQA/train.json", 2, mode)
    proxy.fail("sqa/1.png", 2, mode)
    got = list(iter_decoded(remote, "ScienceQA", "train", 8))
    want = list(iter_decoded(local, "ScienceQA", "train", 8))
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert proxy.seen("ScienceQA/train.json") >= 3 and proxy.seen("sqa/1.png") >= 3


@pytest.mark.parametrize("mode", ["503", "reset"])
@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_a_store_that_keeps_failing_stops_the_read_naming_the_url(flaky, mode: str, on_bad: str) -> None:
    """A store that keeps failing one image: bounded retries, then ``StorageError`` naming the
    image's URL, never a record skipped as bad data (under ``on_bad=skip`` too: nothing half-read
    passes for a complete split)."""
    import time

    _, remote, proxy = flaky
    proxy.fail("sqa/1.png", None, mode)
    t0 = time.time()
    with pytest.raises(storage.StorageError) as info:
        list(iter_decoded(remote, "ScienceQA", "train", 8, on_bad=on_bad, bad_out=[]))
    assert info.value.url == f"{remote.image_root}/sqa/1.png"
    assert str(info.value).startswith(f"{remote.image_root}/sqa/1.png: could not be read from storage")
    assert 3 <= proxy.seen("sqa/1.png") <= 12 and time.time() - t0 < 60  # bounded: 3 attempts per request
    assert FAKE_SECRET not in str(info.value)


def test_a_failing_instructions_file_is_a_storage_error_not_a_missing_file(flaky) -> None:
    _, remote, proxy = flaky
    proxy.fail("GQA", None, "503")  # nothing of GQA exists: a failing store is still not "file not found"
    proxy.fail("ScienceQA/train.json", None, "503")
    with pytest.raises(storage.StorageError) as info:
        load_records(remote, "ScienceQA", "train")
    assert info.value.url == f"{remote.instructions_root}/ScienceQA/train.json"


def test_check_data_on_a_failing_store_exits_2_naming_the_url(flaky, capsys: pytest.CaptureFixture) -> None:
    from tests.test_data_cli import run

    _, remote, proxy = flaky
    proxy.fail("sqa/2.png", None, "503")
    root = remote.instructions_root.rsplit("/", 1)[0]
    code, out, err = run(capsys, "check-data", "--root", root, "--image-root", remote.image_root, "--tasks", "ScienceQA")
    assert code == 2 and "Traceback" not in json.dumps(out) + err
    assert f"{remote.image_root}/sqa/2.png: could not be read from storage" in out["error"]
