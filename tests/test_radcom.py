"""RadComDynamic: the generator writes the published HDF5 format and the reader reads it back exactly."""

from __future__ import annotations

import ast
import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedgradnorm.data import radcom, synthetic_radcom
from fedgradnorm.data.base import DataError, MultiTaskArrays
from fedgradnorm.data.radcom import (
    ANOMALY_SNR_DB,
    MODULATIONS,
    PAIRS,
    SIGNALS,
    SNRS,
    TASKS,
    read_radcom,
)
from fedgradnorm.data.synthetic_radcom import generate_radcom

SMALL = 3


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every cache file inside the test's own folder."""
    monkeypatch.delenv("FEDGRADNORM_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_radcom(tmp_path_factory.mktemp("radcom") / "RadComDynamic.hdf5", samples_per_key=SMALL, seed=7)


def _write_h5(path: Path, datasets: dict[str, object], *, groups: tuple[str, ...] = ()) -> Path:
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f[name] = value
        for name in groups:
            f.create_group(name)
    return path


def _cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("radcom-*.npz")) if folder.is_dir() else []


def _same(a: MultiTaskArrays, b: MultiTaskArrays) -> bool:
    return (
        a.x.tobytes() == b.x.tobytes()
        and all(np.array_equal(a.targets[k], b.targets[k]) for k in TASKS)
        and np.array_equal(a.extras["snr"], b.extras["snr"])
    )


# --------------------------------------------------------------------------------------------------------
# Constants and the generated format
# --------------------------------------------------------------------------------------------------------


def test_constants_match_the_published_description() -> None:
    assert MODULATIONS == ("amdsb", "amssb", "ask", "bpsk", "fmcw", "pulsed")
    assert len(SIGNALS) == 8 and "Ground mapping" in SIGNALS and "AM radio" in SIGNALS
    assert len(PAIRS) == 9 and all(m in MODULATIONS and s in SIGNALS for m, s in PAIRS)
    assert sum(m == "pulsed" for m, _ in PAIRS) == 4
    assert SNRS[0] == -20 and SNRS[-1] == 18 and len(SNRS) == 20
    assert TASKS == ("modulation", "signal", "anomaly")


def test_generated_keys_are_of_the_published_form(small_file: Path) -> None:
    seen: dict[tuple[str, str, int], set[int]] = {}
    with h5py.File(small_file, "r") as f:
        names = list(f.keys())
        for name in names:
            item = f[name]
            assert isinstance(item, h5py.Dataset)
            assert item.shape == (256,) and item.dtype == np.float32
            value = ast.literal_eval(name)
            assert isinstance(value, tuple) and len(value) == 4
            modulation, signal, snr, index = value
            assert type(snr) is int and type(index) is int
            assert str(value) == name  # exactly str() of the Python tuple
            assert (modulation, signal) in PAIRS and snr in SNRS and 0 <= index < SMALL
            seen.setdefault((modulation, signal, snr), set()).add(index)
    assert len(names) == len(PAIRS) * len(SNRS) * SMALL
    assert len(seen) == len(PAIRS) * len(SNRS)
    assert all(indices == set(range(SMALL)) for indices in seen.values())
    assert "('pulsed', 'Airborne-detection', 10, 0)" in names
    assert "('pulsed', 'Ground mapping', -20, 2)" in names


def test_round_trip_matches_the_keys(small_file: Path) -> None:
    data = read_radcom(small_file, cache=False)
    n = len(PAIRS) * len(SNRS) * SMALL
    assert len(data) == n
    assert data.x.shape == (n, 256) and data.x.dtype == np.float32
    assert set(data.targets) == set(TASKS) and set(data.extras) == {"snr"}
    assert all(data.targets[k].dtype == np.int64 for k in TASKS) and data.extras["snr"].dtype == np.int64

    with h5py.File(small_file, "r") as f:
        parsed = sorted(
            (MODULATIONS.index(m), SIGNALS.index(s), snr, i, f[name][()])
            for name in f
            for m, s, snr, i in [ast.literal_eval(name)]
        )
    assert np.array_equal(data.targets["modulation"], [p[0] for p in parsed])
    assert np.array_equal(data.targets["signal"], [p[1] for p in parsed])
    assert np.array_equal(data.extras["snr"], [p[2] for p in parsed])
    assert np.array_equal(data.x, np.stack([p[4] for p in parsed]))
    assert np.array_equal(data.targets["anomaly"], (data.extras["snr"] < ANOMALY_SNR_DB).astype(np.int64))
    assert data.targets["anomaly"].sum() == len(PAIRS) * SMALL * sum(s < -4 for s in SNRS)
    np.testing.assert_allclose(np.mean(data.x.astype(np.float64) ** 2, axis=1), 1.0, rtol=1e-4)


def test_generation_is_deterministic_by_seed(tmp_path: Path) -> None:
    kwargs = {"samples_per_key": 2, "snrs": (-10, 10), "pairs": PAIRS[:4]}
    a = generate_radcom(tmp_path / "a.hdf5", seed=5, **kwargs)
    b = generate_radcom(tmp_path / "b.hdf5", seed=5, **kwargs)
    c = generate_radcom(tmp_path / "c.hdf5", seed=6, **kwargs)
    xa, xb, xc = (read_radcom(p, cache=False).x for p in (a, b, c))
    assert xa.tobytes() == xb.tobytes()
    assert a.read_bytes() == b.read_bytes()  # no timestamps in the file
    assert xa.shape == xc.shape and not np.array_equal(xa, xc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.hdf5", "b.hdf5", "c.hdf5"]  # no temporary left


def test_generated_values_are_pinned(tmp_path: Path) -> None:
    """The generator's values for a fixed seed, as first written: a change to any random stream shows here."""
    pairs = (("pulsed", "Airborne-range"), ("bpsk", "Satcom"))
    path = generate_radcom(tmp_path / "r.hdf5", samples_per_key=2, snrs=(-10, 10), seed=5, pairs=pairs)
    x = read_radcom(path, cache=False).x.astype(np.float64)
    expected = [
        [-1.014133, 0.277989, 0.204219],
        [0.243405, -0.420497, 0.718251],
        [-0.092715, 0.312421, 0.623271],
        [0.300247, 0.696128, 1.159137],
        [0.827686, 0.262583, 0.653635],
        [-0.078065, 0.051561, -0.364701],
        [0.276691, -0.200099, 0.360017],
        [0.055498, -0.042963, -0.097324],
    ]
    np.testing.assert_allclose(x[:, :3], expected, atol=2e-6)
    assert np.abs(x).sum() == pytest.approx(1533.8267006, rel=1e-7)


def test_generator_rejects_bad_arguments(tmp_path: Path) -> None:
    target = tmp_path / "x.hdf5"
    with pytest.raises(ValueError, match="samples_per_key"):
        generate_radcom(target, samples_per_key=0)
    with pytest.raises(ValueError, match="seed"):
        generate_radcom(target, seed=-1)
    with pytest.raises(ValueError, match="snrs"):
        generate_radcom(target, snrs=(0, 0))
    with pytest.raises(ValueError, match="no waveform"):
        generate_radcom(target, pairs=[("bpsk", "AM radio")])
    assert not target.exists()


def test_failed_generation_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = generate_radcom(tmp_path / "r.hdf5", samples_per_key=1, snrs=(0,))
    before = target.read_bytes()
    calls = []

    def failing(*args: object) -> np.ndarray:
        calls.append(args)
        if len(calls) > 2:
            raise RuntimeError("disk on fire")
        return original(*args)

    original = synthetic_radcom._synthesize
    monkeypatch.setattr(synthetic_radcom, "_synthesize", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate_radcom(target, samples_per_key=1, snrs=(0,), seed=1)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.hdf5"]


# --------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------


def test_cache_hit_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = generate_radcom(tmp_path / "RadComDynamic.hdf5", samples_per_key=2, snrs=(-6, 6))
    first = read_radcom(path)
    folder = tmp_path / ".fedgradnorm_cache"
    assert len(_cache_files(folder)) == 1

    def no_decoding(_path: Path) -> None:
        raise AssertionError("the cache was not used")

    with monkeypatch.context() as m:
        m.setattr(radcom, "_decode_file", no_decoding)
        assert _same(read_radcom(path), first)

    generate_radcom(path, samples_per_key=2, snrs=(-6, 6), seed=1)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    changed = read_radcom(path)
    assert not np.array_equal(changed.x, first.x)
    assert _same(changed, read_radcom(path, cache=False))
    assert len(_cache_files(folder)) == 1  # the stale entry was replaced

    name = "('ask', 'short-range', 6, 1)"
    with h5py.File(path, "r+") as f:  # edited in place: same inode and size
        f[name][...] = np.full(256, 0.5, np.float32)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    edited = read_radcom(path)
    row = np.flatnonzero((edited.targets["modulation"] == MODULATIONS.index("ask")) & (edited.extras["snr"] == 6))[1]
    assert np.all(edited.x[row] == 0.5)
    assert _same(edited, read_radcom(path, cache=False))


def test_corrupt_cache_is_ignored_and_rebuilt(tmp_path: Path) -> None:
    path = generate_radcom(tmp_path / "RadComDynamic.hdf5", samples_per_key=2, snrs=(0,))
    expected = read_radcom(path, cache=False)
    read_radcom(path)
    [cache_file] = _cache_files(tmp_path / ".fedgradnorm_cache")

    cache_file.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    assert _same(read_radcom(path), expected)
    assert _same(read_radcom(path), expected)  # rebuilt, now a valid hit

    with np.load(cache_file) as stored:
        arrays = dict(stored)
    arrays["modulation"] = arrays["modulation"] + 100  # valid archive, impossible labels
    with open(cache_file, "wb") as fh:
        np.savez(fh, **arrays)
    assert _same(read_radcom(path), expected)


def test_cache_folders_fall_back_and_follow_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = generate_radcom(tmp_path / "data" / "RadComDynamic.hdf5", samples_per_key=1, snrs=(0,))
    (tmp_path / "data" / ".fedgradnorm_cache").write_text("a file where the cache folder would go")
    expected = read_radcom(path, cache=False)
    assert _same(read_radcom(path), expected)
    assert len(_cache_files(tmp_path / "home" / ".cache" / "fedgradnorm")) == 1

    monkeypatch.setenv("FEDGRADNORM_CACHE_DIR", str(tmp_path / "env-cache"))
    assert _same(read_radcom(path), expected)  # served by the home cache, which is still valid
    (tmp_path / "home" / ".cache" / "fedgradnorm").rename(tmp_path / "old-home-cache")
    assert _same(read_radcom(path), expected)
    assert len(_cache_files(tmp_path / "env-cache")) == 1


def test_full_disk_skips_the_cache_folder_and_fails_generation_cleanly(
    tmp_path: Path, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = generate_radcom(tmp_path / "RadComDynamic.hdf5", samples_per_key=12)  # about 2 MiB of vectors
    monkeypatch.setenv("FEDGRADNORM_CACHE_DIR", str(small_disk / "cache"))
    expected = read_radcom(path, cache=False)
    assert _same(read_radcom(path), expected)
    assert list((small_disk / "cache").iterdir()) == []  # the partial file was removed
    assert len(_cache_files(tmp_path / ".fedgradnorm_cache")) == 1

    with pytest.raises(OSError):
        generate_radcom(small_disk / "RadComDynamic.hdf5", samples_per_key=12)
    assert sorted(p.name for p in small_disk.iterdir()) == ["cache"]


# --------------------------------------------------------------------------------------------------------
# Hand-written files of the real format
# --------------------------------------------------------------------------------------------------------


def test_hand_written_file_of_the_real_format(tmp_path: Path) -> None:
    ramp = np.arange(256, dtype=np.float32) / 256
    iq = np.stack([np.linspace(-1, 1, 128), np.linspace(1, -1, 128)])
    path = _write_h5(
        tmp_path / "real.hdf5",
        {
            "('pulsed', 'Airborne-detection', 10, 0)": ramp,
            "('bpsk', 'Satcom', -10, 42)": ramp.astype(np.float64)[::-1].copy(),
            "('amdsb', 'AM radio', -4, 1)": iq,
            "('ask', 'short-range', -6, 5)": (iq[0] + 1j * iq[1]).astype(np.complex64),
            "('amssb', 'AM radio', 18, 699)": ramp.reshape(256, 1),
        },
    )
    data = read_radcom(path, cache=False)
    assert len(data) == 5
    assert data.targets["modulation"].tolist() == [0, 1, 2, 3, 5]
    assert data.targets["signal"].tolist() == [0, 0, 7, 6, 2]
    assert data.extras["snr"].tolist() == [-4, 18, -6, -10, 10]
    assert data.targets["anomaly"].tolist() == [0, 0, 1, 1, 0]
    np.testing.assert_array_equal(data.x[0], iq.reshape(256).astype(np.float32))
    np.testing.assert_array_equal(data.x[1], ramp)
    np.testing.assert_array_equal(data.x[2], iq.reshape(256).astype(np.float32))
    np.testing.assert_array_equal(data.x[3], ramp[::-1])
    np.testing.assert_array_equal(data.x[4], ramp)


def test_other_storage_layouts_read_the_same(tmp_path: Path) -> None:
    """A user block, big-endian doubles, chunked + gzip and compact storage all give the same vectors."""
    ramp = np.linspace(-1, 1, 256)
    path = tmp_path / "layouts.hdf5"
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("('bpsk', 'Satcom', 0, 0)", data=ramp.astype(">f8"))
        f.create_dataset("('bpsk', 'Satcom', 0, 1)", data=ramp.astype(">f8")[::-1])
        f.create_dataset("('bpsk', 'Satcom', 0, 2)", data=ramp.astype("<f4"), chunks=(64,), compression="gzip")
        space = h5py.h5s.create_simple((256,))
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        compact = h5py.h5d.create(f.id, b"('bpsk', 'Satcom', 0, 3)", h5py.h5t.IEEE_F32LE, space, dcpl=dcpl)
        compact.write(h5py.h5s.ALL, h5py.h5s.ALL, ramp.astype(np.float32))
    data = read_radcom(path, cache=False)
    expected = ramp.astype(np.float32)
    for row, values in enumerate([expected, expected[::-1], expected, expected]):
        np.testing.assert_array_equal(data.x[row], values)


def test_awgn_variant_raw_signal_label_reads_as_satcom(tmp_path: Path) -> None:
    path = _write_h5(tmp_path / "RadComAWGN.hdf5", {"('bpsk', 'Raw', 0, 0)": np.ones(256)})
    assert read_radcom(path, cache=False).targets["signal"].tolist() == [SIGNALS.index("Satcom")]


# --------------------------------------------------------------------------------------------------------
# Bad input: always DataError naming the file and the problem
# --------------------------------------------------------------------------------------------------------

_GOOD = np.zeros(256, np.float32)


def _bad(datasets: dict[str, object], groups: tuple[str, ...] = ()) -> Callable[[Path], Path]:
    return lambda p: _write_h5(p, datasets, groups=groups)


def _truncated(path: Path) -> Path:
    generate_radcom(path, samples_per_key=2, snrs=(0, 2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _write_bytes(content: bytes) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        path.write_bytes(content)
        return path

    return make


BAD_FILES: list[tuple[str, Callable[[Path], Path], list[str]]] = [
    ("missing", lambda p: p, ["file not found"]),
    ("directory", lambda p: (p.mkdir(), p)[1], ["is a directory"]),
    ("empty", _write_bytes(b""), ["empty", "0 bytes"]),
    ("not-hdf5", _write_bytes(b"modulation,signal\npulsed,Satcom\n"), ["not an HDF5 file"]),
    ("truncated", _truncated, ["HDF5"]),
    ("no-datasets", _bad({}), ["no datasets"]),
    ("bad-key", _bad({"hello": _GOOD}), ["'hello'", "published form"]),
    ("code-key", _bad({"__import__('os').getcwd()": _GOOD}), ["__import__", "published form"]),
    ("short-key", _bad({"('pulsed', 'Satcom', 10)": _GOOD}), ["('pulsed', 'Satcom', 10)", "published form"]),
    ("float-snr", _bad({"('bpsk', 'Satcom', 1.5, 0)": _GOOD}), ["1.5", "published form"]),
    ("length", _bad({"('bpsk', 'Satcom', 0, 0)": np.zeros(255)}), ["('bpsk', 'Satcom', 0, 0)", "255 values"]),
    ("columns", _bad({"('bpsk', 'Satcom', 0, 0)": np.zeros((128, 2))}), ["(128, 2)", "expected 256"]),
    ("modulation", _bad({"('qpsk', 'Satcom', 0, 0)": _GOOD}), ["unknown modulation 'qpsk'"]),
    ("signal", _bad({"('pulsed', 'Weather radar', 0, 0)": _GOOD}), ["unknown signal 'Weather radar'"]),
    ("group", _bad({}, groups=("('bpsk', 'Satcom', 0, 0)",)), ["('bpsk', 'Satcom', 0, 0)", "is a group"]),
    ("text-value", _bad({"('bpsk', 'Satcom', 0, 0)": "I and Q"}), ["('bpsk', 'Satcom', 0, 0)", "type"]),
    ("nan", _bad({"('bpsk', 'Satcom', 0, 0)": np.full(256, np.nan)}), ["non-finite"]),
    (
        "duplicate",
        _bad({"('bpsk', 'Satcom', 0, 0)": _GOOD, "('bpsk','Satcom',0,0)": _GOOD}),
        ["same sample", "('bpsk','Satcom',0,0)"],
    ),
]


@pytest.mark.parametrize(("make", "problems"), [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_input_raises_data_error(tmp_path: Path, make: Callable[[Path], Path], problems: list[str]) -> None:
    path = make(tmp_path / "RadComDynamic.hdf5")
    with pytest.raises(DataError) as info:
        read_radcom(path)
    message = str(info.value)
    assert message.startswith(str(path))
    for problem in problems:
        assert problem in message
    assert not _cache_files(tmp_path / ".fedgradnorm_cache")


# --------------------------------------------------------------------------------------------------------
# The synthetic tasks are learnable
# --------------------------------------------------------------------------------------------------------


def _features(x: np.ndarray) -> np.ndarray:
    """Phase- and shift-invariant features: log magnitude spectrum and sorted amplitudes."""
    z = x[:, :128].astype(np.float64) + 1j * x[:, 128:]
    return np.concatenate([np.log1p(np.abs(np.fft.fft(z, axis=1))), np.sort(np.abs(z), axis=1)], axis=1)


def _nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray, train: np.ndarray) -> float:
    mean, std = features[train].mean(0), features[train].std(0) + 1e-9
    f = (features - mean) / std
    classes = np.unique(labels[train])
    centroids = np.stack([f[train & (labels == c)].mean(0) for c in classes])
    distance = ((f[~train, None, :] - centroids[None]) ** 2).sum(-1)
    return float((classes[distance.argmin(1)] == labels[~train]).mean())


def test_tasks_are_learnable(tmp_path: Path) -> None:
    path = generate_radcom(tmp_path / "r.hdf5", samples_per_key=24, snrs=(-20, -18, 14, 16, 18), seed=3)
    data = read_radcom(path, cache=False)
    features = _features(data.x)
    train = np.random.default_rng(0).permutation(len(data)) % 2 == 0
    high = data.extras["snr"] >= 14

    modulation = data.targets["modulation"]
    high_idx = np.flatnonzero(high)
    accuracy = _nearest_centroid_accuracy(features[high_idx], modulation[high_idx], train[high_idx])
    assert accuracy > 0.8  # 6 classes; guessing the largest class gets 4/9

    signal = data.targets["signal"]
    pulsed = np.flatnonzero(high & (modulation == MODULATIONS.index("pulsed")))
    assert _nearest_centroid_accuracy(features[pulsed], signal[pulsed], train[pulsed]) > 0.7  # 4 classes

    anomaly = data.targets["anomaly"]
    assert _nearest_centroid_accuracy(features, anomaly, train) > 0.9
