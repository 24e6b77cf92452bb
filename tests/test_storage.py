"""The activation file contract: exact round trips, checksums that catch a flipped byte, extra row
fields, and partial files without our header started again (shards and MPI-IO)."""

from __future__ import annotations

import json
import subprocess
import zlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from helpers import PYTHON, REPO, env
from replandscape.errors import UserError
from replandscape.storage import (
    NUMERIC_ROW_FIELDS,
    STRING_ROW_FIELDS,
    ShardWriter,
    SiteSpec,
    crc32_combine,
    dataset_digest,
    finalize_shards,
    mpio_path,
    open_activations,
    shard_path,
)

N = 37
SITES = [SiteSpec("input_layernorm.00", 24, "float32"), SiteSpec("input_layernorm.01", 24,
                                                                   "bfloat16"),
         SiteSpec("logits", 40, "float16")]
EXTRA_FIELDS = {"correct_substring": np.bool_, "score": np.float32}
STAGE = "stage-a"


def make_data(n: int = N, extras: bool = False) -> dict[str, Any]:
    """Deterministic rows and site arrays (as stored) for a file of ``n`` rows."""
    rng = np.random.default_rng(7)
    sites = {}
    for s in SITES:
        if s.dtype == "bfloat16":
            sites[s.name] = rng.integers(0, 2**16, size=(n, s.dim), dtype=np.uint16)
        else:
            sites[s.name] = rng.standard_normal((n, s.dim)).astype(s.dtype)
    answer = rng.integers(0, 4, n).astype(np.int8)
    predicted = rng.integers(0, 4, n).astype(np.int8)
    rows: dict[str, np.ndarray] = {
        "question_id": np.arange(n, dtype=np.int64) * 3 + 1, "answer": answer,
        "predicted": predicted, "correct": answer == predicted,
        "n_tokens": rng.integers(5, 900, n).astype(np.int32)}
    if extras:
        rows["correct_substring"] = rng.random(n) < 0.5
        rows["score"] = rng.random(n).astype(np.float32)
    subjects = [f"subject_{i % 4}" for i in range(n)]
    prompts = [f"Question {i}: é ≠ {'x' * (i % 7)}\nAnswer:" for i in range(n)]
    strings = {"variant": [f"v{i % 3}" for i in range(n)],
               "continuation": [f" the answer is {'ABCD'[i % 4]} ✓" for i in range(n)]}
    return {"sites": sites, "rows": rows, "subjects": subjects, "prompts": prompts,
            "strings": strings if extras else {}}


HEADER = {"site_names": [s.name for s in SITES], "stage_hash": STAGE, "world_size": 2}


def write_shards(final: Path, data: dict[str, Any], world: int = 2, *,
                 extras: bool = False) -> Path:
    """Each rank's shard written in shuffled batches, then the finalisation."""
    n = len(data["subjects"])
    bounds = [(n * r // world, n * (r + 1) // world) for r in range(world)]
    rng = np.random.default_rng(1)
    for rank, (start, stop) in enumerate(bounds):
        writer = ShardWriter(final, rank, world, start, stop, SITES, STAGE,
                             extra_fields=EXTRA_FIELDS if extras else {})
        order = rng.permutation(np.arange(start, stop))
        for batch in np.array_split(order, 3):
            writer.write(batch, {k: v[batch] for k, v in data["sites"].items()},
                         {k: v[batch] for k, v in data["rows"].items()})
        writer.close()
    return finalize_shards(final, world, SITES, HEADER, data["subjects"], data["prompts"],
                           extra_fields=EXTRA_FIELDS if extras else {},
                           extra_strings=data["strings"])


def assert_reads_back(final: Path, data: dict[str, Any]) -> None:
    with open_activations(final) as af:
        for s in SITES:
            raw = np.asarray(af.fh["sites"][s.name][:])
            assert np.array_equal(raw, data["sites"][s.name]), s.name
            got = af.site(s.name)
            assert got.dtype == np.float32 and got.shape == (N, s.dim)
            pick = np.array([5, 0, 30, 2])
            assert np.array_equal(af.site(s.name, pick), got[pick])
        for name, values in data["rows"].items():
            assert np.array_equal(af.rows(name), values), name
        assert list(af.rows("subject")) == data["subjects"]
        assert list(af.rows("prompt")) == data["prompts"]
        for name, values in data["strings"].items():
            assert list(af.rows(name)) == list(values)
        # the digests chained from the ranks' blocks equal those of the bytes read back
        for key, digest in af.digests.items():
            assert dataset_digest(af.fh[key]) == digest, key
        af.verify()
        assert len(af.content_digest) == 32


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x5A]))


def contiguous_offset(path: Path, key: str, row: int) -> int:
    with h5py.File(path, "r") as fh:
        ds = fh[key]
        offset = ds.id.get_offset()
        assert offset is not None, key
        return int(offset) + row * int(np.prod(ds.shape[1:])) * ds.dtype.itemsize


def expect_damage(final: Path, read: Any, key: str) -> str:
    with open_activations(final) as af, pytest.raises(UserError) as err:
        read(af)
    line = str(err.value)
    assert "\n" not in line and f"checksum mismatch in {key}" in line and str(final) in line
    assert "re-run the extraction" in line
    return line


def test_crc32_combine_equals_the_crc_of_the_concatenation() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.bytes(int(rng.integers(0, 3000)))
        b = rng.bytes(int(rng.integers(0, 3000)))
        seed = int(rng.integers(0, 2**32))
        assert crc32_combine(zlib.crc32(a, seed), zlib.crc32(b), len(b)) == zlib.crc32(a + b, seed)
    assert crc32_combine(123, 0, 0) == 123


def test_shards_read_back_exactly_and_without_extras_keep_todays_datasets(tmp_path: Path) -> None:
    data = make_data()
    final = write_shards(tmp_path / "shots0.h5", data)
    assert_reads_back(final, data)
    with open_activations(final) as af:
        today = set(NUMERIC_ROW_FIELDS) | set(STRING_ROW_FIELDS)
        assert set(af.row_fields) == today
        assert set(af.digests) == {f"rows/{k}" for k in today} | {f"sites/{s.name}"
                                                                   for s in SITES}
        assert af.attrs["digest_algorithm"] == "crc32" and af.attrs["schema_version"] == 2
        identity = af.content_digest
    # the content identity does not depend on the writer's world size or batch order
    again = write_shards(tmp_path / "again" / "shots0.h5", data, world=3)
    with open_activations(again) as af:
        assert af.content_digest == identity
    other = make_data()
    other["rows"]["answer"][3] ^= 1
    changed = write_shards(tmp_path / "other" / "shots0.h5", other)
    with open_activations(changed) as af:
        assert af.content_digest != identity


def test_extra_row_fields_and_strings_are_stored_listed_and_digested(tmp_path: Path) -> None:
    data = make_data(extras=True)
    final = write_shards(tmp_path / "gen.h5", data, extras=True)
    assert_reads_back(final, data)
    with open_activations(final) as af:
        assert {"correct_substring", "score", "variant", "continuation"} <= set(af.row_fields)
        assert af.rows("correct_substring").dtype == np.bool_
        assert af.rows("score").dtype == np.float32
        assert "rows/continuation" in af.digests and "rows/score" in af.digests
    # fields the writers were given are kept even when the finalisation is not told of them
    data2 = make_data(extras=True)
    data2["strings"] = {}
    n = N
    for rank, (start, stop) in enumerate([(0, n // 2), (n // 2, n)]):
        w = ShardWriter(tmp_path / "b.h5", rank, 2, start, stop, SITES, STAGE,
                        extra_fields=EXTRA_FIELDS)
        rows = np.arange(start, stop)
        w.write(rows, {k: v[rows] for k, v in data2["sites"].items()},
                {k: v[rows] for k, v in data2["rows"].items()})
        w.close()
    finalize_shards(tmp_path / "b.h5", 2, SITES, HEADER, data2["subjects"], data2["prompts"])
    assert_reads_back(tmp_path / "b.h5", data2)
    with pytest.raises(ValueError, match="already stored"):
        ShardWriter(tmp_path / "c.h5", 0, 1, 0, 1, SITES, STAGE, extra_fields={"answer": np.int8})
    with pytest.raises(ValueError, match="extra_strings"):
        ShardWriter(tmp_path / "c.h5", 0, 1, 0, 1, SITES, STAGE, extra_fields={"t": object})


def test_flipped_bytes_in_a_shard_or_a_row_label_are_one_line_errors(tmp_path: Path) -> None:
    data = make_data(extras=True)
    final = write_shards(tmp_path / "shots5.h5", data, extras=True)
    shard = shard_path(final, 1)
    with h5py.File(shard, "r") as sh:
        chunk = sh["sites/input_layernorm.01"].id.get_chunk_info(0).byte_offset
    saved = shard.read_bytes()
    flip_byte(shard, chunk + 7)
    expect_damage(final, lambda af: af.site("input_layernorm.01"), "sites/input_layernorm.01")
    expect_damage(final, lambda af: af.site("input_layernorm.01", np.array([0])),
                  "sites/input_layernorm.01")
    with open_activations(final) as af:  # the other sites are intact and still read
        assert np.array_equal(af.fh["sites/logits"][:], data["sites"]["logits"])
        af.site("logits")
        with pytest.raises(UserError, match="checksum mismatch in sites/input_layernorm.01"):
            af.verify()
    shard.write_bytes(saved)
    assert_reads_back(final, data)
    for key, row in (("rows/answer", 11), ("rows/question_id", 0), ("rows/prompt_sha256", 3),
                     ("rows/score", 36)):
        before = final.read_bytes()
        flip_byte(final, contiguous_offset(final, key, row))
        name = key.split("/")[1]
        expect_damage(final, lambda af, name=name: af.rows(name), key)
        final.write_bytes(before)
    assert_reads_back(final, data)


def test_a_value_changed_behind_the_file_is_caught_by_its_digest(tmp_path: Path) -> None:
    """A shard value rewritten through HDF5 keeps a valid fletcher32; the digest still sees it."""
    data = make_data()
    final = write_shards(tmp_path / "shots0.h5", data)
    with h5py.File(shard_path(final, 0), "r+") as sh:
        ds = sh["sites/logits"]
        ds[2, 3] = ds[2, 3] + np.float16(1)  # a consistent chunk checksum, a wrong value
    expect_damage(final, lambda af: af.site("logits"), "sites/logits")


def test_a_flipped_byte_in_a_shards_row_labels_stops_the_finalisation(tmp_path: Path) -> None:
    data = make_data()
    final = tmp_path / "shots0.h5"
    writer = ShardWriter(final, 0, 1, 0, N, SITES, STAGE)
    rows = np.arange(N)
    writer.write(rows, data["sites"], data["rows"])
    writer.close()
    with h5py.File(shard_path(final, 0), "r") as sh:
        offset = sh["rows/answer"].id.get_chunk_info(0).byte_offset
    flip_byte(shard_path(final, 0), offset + 4)
    with pytest.raises(UserError, match="rows/answer of the shard of rank 0 is damaged"):
        finalize_shards(final, 1, SITES, HEADER, data["subjects"], data["prompts"])
    assert not final.exists()


def test_the_digest_attributes_are_checked_at_open(tmp_path: Path) -> None:
    data = make_data()
    final = write_shards(tmp_path / "shots0.h5", data)
    with h5py.File(final, "r+") as fh:
        digests = json.loads(fh.attrs["digests"])
        digests["rows/answer"] = "00000000"
        fh.attrs["digests"] = json.dumps(digests)
    with pytest.raises(UserError, match="content digest does not match"), \
            open_activations(final):
        pass
    with h5py.File(final, "r+") as fh:
        del digests["rows/answer"]
        fh.attrs["digests"] = json.dumps(digests)
    with pytest.raises(UserError, match="digests do not name the stored datasets"), \
            open_activations(final):
        pass
    with h5py.File(final, "r+") as fh:
        fh.attrs["schema_version"] = 1
    with pytest.raises(UserError, match="schema version 1.*re-run the extraction"), \
            open_activations(final):
        pass


def test_shard_finalisation_digests_by_reading_when_a_rank_left_no_block_crc(
        tmp_path: Path) -> None:
    data = make_data()
    final = tmp_path / "shots0.h5"
    half = N // 2
    first = ShardWriter(final, 0, 2, 0, half, SITES, STAGE)
    rows = np.arange(0, 10)
    first.write(rows, {k: v[rows] for k, v in data["sites"].items()},
                {k: v[rows] for k, v in data["rows"].items()})
    first.close()  # a kill after a batch: incomplete, no block digests
    with h5py.File(shard_path(final, 0), "r") as sh:
        assert not sh.attrs["complete"] and "block_crc" not in sh["sites/logits"].attrs
    resumed = ShardWriter(final, 0, 2, 0, half, SITES, STAGE)
    assert resumed.done_mask().sum() == 10
    rows = np.arange(10, half)
    resumed.write(rows, {k: v[rows] for k, v in data["sites"].items()},
                  {k: v[rows] for k, v in data["rows"].items()})
    resumed.close()
    second = ShardWriter(final, 1, 2, half, N, SITES, STAGE)
    rows = np.arange(half, N)
    second.write(rows, {k: v[rows] for k, v in data["sites"].items()},
                 {k: v[rows] for k, v in data["rows"].items()})
    second.close()
    with h5py.File(shard_path(final, 1), "r+") as sh:
        del sh["sites/logits"].attrs["block_crc"]
    finalize_shards(final, 2, SITES, HEADER, data["subjects"], data["prompts"])
    assert_reads_back(final, data)


@pytest.mark.parametrize("content", ["empty", "no-attrs", "foreign-attrs", "header-no-layout"])
def test_a_shard_without_our_header_is_started_again(tmp_path: Path, content: str) -> None:
    final = tmp_path / "shots0.h5"
    shard = shard_path(final, 0)
    shard.parent.mkdir(parents=True)
    _write_headerless(shard, content)
    data = make_data()
    write_shards(final, data, world=1)
    assert_reads_back(final, data)


def test_a_shard_of_another_config_is_refused_untouched(tmp_path: Path) -> None:
    final = tmp_path / "shots0.h5"
    ShardWriter(final, 0, 1, 0, N, SITES, "stage-b").close()
    before = shard_path(final, 0).read_bytes()
    with pytest.raises(UserError, match="different config"):
        ShardWriter(final, 0, 1, 0, N, SITES, STAGE)
    assert shard_path(final, 0).read_bytes() == before


def _write_headerless(path: Path, content: str) -> None:
    if content == "empty":
        path.write_bytes(b"")
        return
    with h5py.File(path, "w") as fh:
        if content == "foreign-attrs":
            fh.attrs["kind"] = "something.else"
            fh.attrs["stage_hash"] = "x"
            fh.create_dataset("data", data=np.arange(3))
        elif content == "header-no-layout":
            # our header with this config but a layout cut short (an older writer's order)
            fh.attrs.update(kind="replandscape.activation-shard", stage_hash=STAGE, n_rows=N,
                            start=0, stop=N, world_size=1)
            fh.create_group("sites")


# --------------------------------------------------------------------------------------------
# MPI-IO: one shared file written by two ranks
# --------------------------------------------------------------------------------------------

MPI_SCRIPT = r"""
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, sys.argv[3])
from test_storage import EXTRA_FIELDS, HEADER, SITES, make_data  # noqa: E402

from replandscape.dist import mpi  # noqa: E402
from replandscape.errors import UserError  # noqa: E402
from replandscape.storage import MpioWriter, finalize_mpio, mpio_path  # noqa: E402

final, stage = Path(sys.argv[1]), sys.argv[2]
comm = mpi.world()
assert comm.size == 2
data = make_data(extras=True)
n = len(data["subjects"])
start, stop = (0, 15) if comm.rank == 0 else (15, n)
try:
    writer = MpioWriter(final, comm, n, SITES, stage, extra_fields=EXTRA_FIELDS)
except UserError as exc:
    print(f"REFUSED {exc}", flush=True)
    sys.exit(3)
todo = np.arange(start, stop)[~writer.done_rows(start, stop)]
batches = np.array_split(todo[::-1], 3)  # unequal, reversed: any order, any sizes
for batch in batches:
    writer.write(batch, {k: v[batch] for k, v in data["sites"].items()},
                 {k: v[batch] for k, v in data["rows"].items()})
writer.close()
comm.Barrier()
if comm.rank == 0:
    with h5py.File(mpio_path(final), "r") as fh:
        assert all("block_crcs" in fh["sites"][s.name].attrs for s in SITES)
    finalize_mpio(final, SITES, HEADER, data["subjects"], data["prompts"],
                  extra_fields=EXTRA_FIELDS, extra_strings=data["strings"])
comm.Barrier()
print("DONE", flush=True)
"""


def _run_mpio(tmp_path: Path, final: Path, stage: str = STAGE) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "mpio_writer.py"
    script.write_text(MPI_SCRIPT)
    cmd = ["mpiexec", "-n", "2", "--oversubscribe", "--bind-to", "none", PYTHON, str(script),
           str(final), stage, str(Path(__file__).parent)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)


def _needs_mpio() -> None:
    if not h5py.get_config().mpi:
        pytest.skip("h5py was built without MPI")


@pytest.mark.mpi
def test_mpio_file_reads_back_exactly_and_catches_flipped_bytes(tmp_path: Path) -> None:
    _needs_mpio()
    final = tmp_path / "shots5.h5"
    proc = _run_mpio(tmp_path, final)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = make_data(extras=True)
    assert_reads_back(final, data)
    with open_activations(final) as af:
        assert af.attrs["writer"] == "mpio"
        assert "block_crcs" not in af.fh["sites/logits"].attrs
        identity = af.content_digest
    ref = write_shards(tmp_path / "ref" / "shots5.h5", data, extras=True)
    with open_activations(ref) as af:
        assert af.content_digest == identity  # same content, same identity, either writer
    before = final.read_bytes()
    flip_byte(final, contiguous_offset(final, "sites/input_layernorm.00", 20) + 5)
    line = expect_damage(final, lambda af: af.site("input_layernorm.00"),
                         "sites/input_layernorm.00")
    assert "HDF5" not in line  # no filter on the shared file: the digest caught it
    final.write_bytes(before)
    flip_byte(final, contiguous_offset(final, "rows/answer", 30))
    expect_damage(final, lambda af: af.rows("answer"), "rows/answer")


@pytest.mark.mpi
@pytest.mark.parametrize("content", ["empty", "no-attrs"])
def test_an_mpio_file_without_our_header_is_started_again(tmp_path: Path, content: str) -> None:
    _needs_mpio()
    final = tmp_path / "shots5.h5"
    _write_headerless(mpio_path(final), content)
    proc = _run_mpio(tmp_path, final)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "DONE" in proc.stdout and not mpio_path(final).exists()
    assert_reads_back(final, make_data(extras=True))


@pytest.mark.mpi
def test_an_mpio_file_of_another_config_is_refused_untouched(tmp_path: Path) -> None:
    _needs_mpio()
    final = tmp_path / "shots5.h5"
    with h5py.File(mpio_path(final), "w") as fh:
        fh.attrs.update(kind="replandscape.activation-shard", stage_hash="stage-b", n_rows=N)
    before = mpio_path(final).read_bytes()
    proc = _run_mpio(tmp_path, final)
    assert proc.returncode != 0
    assert proc.stdout.count("REFUSED") == 2 and "different config" in proc.stdout
    assert mpio_path(final).read_bytes() == before
