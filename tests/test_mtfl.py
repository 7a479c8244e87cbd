"""MTFL: the reader of the published layout, the generator that writes it, and the cache of decoded arrays."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PureWindowsPath

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fedgradnorm.data import mtfl, synthetic_mtfl
from fedgradnorm.data.base import DataError
from fedgradnorm.data.mtfl import (
    IMAGE_SIZE,
    LANDMARK_NAMES,
    NUM_CLASSES,
    TASKS,
    read_mtfl,
)
from fedgradnorm.data.synthetic_mtfl import generate_mtfl

ATTRS = ("gender", "smile", "glasses", "pose")


@pytest.fixture(autouse=True)
def _no_cache_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches go beside the annotation file (inside tmp_path) unless a test says otherwise."""
    monkeypatch.delenv("FEDGRADNORM_CACHE_DIR", raising=False)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_mtfl(tmp_path_factory.mktemp("gen") / "MTFL", n_train=60, n_test=20, seed=3, workers=1)


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def _image_of(root: Path, line: str) -> Path:
    return root.joinpath(*PureWindowsPath(line.split()[0]).parts)


def _write_image(path: Path, size: tuple[int, int], color: int | tuple[int, int, int] = (120, 90, 60)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG", quality=95)


def _mini_root(tmp_path: Path, lines: list[str]) -> Path:
    """An MTFL folder with one 250×250 image and the given training.txt lines."""
    root = tmp_path / "MTFL"
    _write_image(root / "lfw_5590" / "Aaron_Eckhart_0001.jpg", (250, 250))
    (root / "training.txt").write_text("\n".join(lines) + "\n")
    return root


GOOD = " lfw_5590\\Aaron_Eckhart_0001.jpg 107.25 147.75 126.25 106.25 140.75 108.75 113.25 143.75 158.75 162.75 1 2 2 3"


# ---------------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------------


def test_constants() -> None:
    assert TASKS == ("landmarks", "gender", "smile", "glasses", "pose")
    assert NUM_CLASSES == {"gender": 2, "smile": 2, "glasses": 2, "pose": 5}
    assert IMAGE_SIZE == 40
    assert LANDMARK_NAMES == ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


# ---------------------------------------------------------------------------------------------------
# Generator -> reader
# ---------------------------------------------------------------------------------------------------


def test_generated_layout_and_annotation_format(generated: Path) -> None:
    for folder in ("AFLW", "lfw_5590", "net_7876"):
        assert (generated / folder).is_dir()
    assert not list(generated.glob("*.tmp")) and not list(generated.glob(".*.tmp"))
    for split, n, folders in (("training", 60, {"lfw_5590", "net_7876"}), ("testing", 20, {"AFLW"})):
        lines = _lines(generated / f"{split}.txt")
        assert len(lines) == n
        seen = set()
        for line in lines:
            assert line.startswith(" ")
            fields = line.split()
            assert len(fields) == 15
            assert "\\" in fields[0] and "/" not in fields[0]
            seen.add(fields[0].split("\\")[0])
            assert all("." in f for f in fields[1:11])  # landmarks written as decimals
            gender, smile, glasses, pose = map(int, fields[11:])
            assert gender in (1, 2) and smile in (1, 2) and glasses in (1, 2) and 1 <= pose <= 5
            with Image.open(_image_of(generated, line)) as img:
                assert img.format == "JPEG"
                if fields[0].startswith("lfw_5590"):
                    assert img.size == (250, 250)
                xs, ys = np.array(fields[1:6], float), np.array(fields[6:11], float)
                assert (xs > 0).all() and (xs < img.width).all() and (ys > 0).all() and (ys < img.height).all()
        assert seen == folders
    train_names = [line.split()[0] for line in _lines(generated / "training.txt")]
    assert len(set(train_names)) == len(train_names)


def test_round_trip(generated: Path) -> None:
    data = read_mtfl(generated, "training")
    assert len(data) == 60
    assert data.x.shape == (60, 1, 40, 40) and data.x.dtype == np.float32
    assert data.x.min() >= 0.0 and data.x.max() <= 1.0 and data.x.std() > 0.05
    assert set(data.targets) == set(TASKS)
    lm = data.targets["landmarks"]
    assert lm.shape == (60, 10) and lm.dtype == np.float32
    lines = _lines(generated / "training.txt")
    for i in (0, 17, 59):
        fields = lines[i].split()
        with Image.open(_image_of(generated, lines[i])) as img:
            w, h = img.size
        raw = np.array(fields[1:11], dtype=np.float64)
        expected = np.concatenate([raw[:5] * 40 / w, raw[5:] * 40 / h])
        np.testing.assert_allclose(lm[i], expected, rtol=1e-6, atol=1e-4)
    raw_labels = np.array([[int(f) for f in line.split()[11:]] for line in lines])
    for j, name in enumerate(ATTRS):
        labels = data.targets[name]
        assert labels.dtype == np.int64 and labels.shape == (60,)
        np.testing.assert_array_equal(labels, raw_labels[:, j] - 1)
        assert labels.min() >= 0 and labels.max() < NUM_CLASSES[name]
    assert (lm >= 0).all() and (lm <= 40).all()

    normalized = read_mtfl(generated, "training", normalize_landmarks=True)
    np.testing.assert_allclose(normalized.targets["landmarks"], lm / 40, rtol=1e-6)
    np.testing.assert_array_equal(normalized.x, data.x)
    test = read_mtfl(generated, "testing", size=32)
    assert test.x.shape == (20, 1, 32, 32)


def test_generator_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = generate_mtfl(tmp_path / "a", n_train=6, n_test=3, seed=11, workers=1)
    b = generate_mtfl(tmp_path / "b", n_train=6, n_test=3, seed=11, workers=1)
    c = generate_mtfl(tmp_path / "c", n_train=6, n_test=3, seed=12, workers=1)
    for split in ("training", "testing"):
        text = (a / f"{split}.txt").read_text()
        assert text == (b / f"{split}.txt").read_text()
        assert text != (c / f"{split}.txt").read_text()
        for line in _lines(a / f"{split}.txt"):
            assert _image_of(a, line).read_bytes() == _image_of(b, line).read_bytes()
    # Worker threads draw the same faces as a single thread.
    monkeypatch.setattr(synthetic_mtfl, "_CHUNK", 2)
    d = generate_mtfl(tmp_path / "d", n_train=6, n_test=3, seed=11, workers=2)
    for split in ("training", "testing"):
        assert (d / f"{split}.txt").read_text() == (a / f"{split}.txt").read_text()
    for line in _lines(a / "training.txt"):
        assert _image_of(a, line).read_bytes() == _image_of(d, line).read_bytes()


def test_generated_annotations_are_pinned(tmp_path: Path) -> None:
    """The annotation lines for a fixed seed, as written by generator version 2: a change to any random
    stream shows here (and needs a new GENERATOR_VERSION)."""
    root = generate_mtfl(tmp_path / "MTFL", n_train=6, n_test=3, seed=11, workers=1)
    text = (root / "training.txt").read_text() + (root / "testing.txt").read_text()
    assert text.startswith(" lfw_5590\\Laura_Lopez_0001.jpg 128.40 156.12 147.41 124.40 150.65 125.25 ")
    assert (
        hashlib.sha256(text.encode()).hexdigest() == "4428dea090d43f5b7f01e4b09c6462408228f371236c0f0924bee178466e81b7"
    )


def test_generator_rejects_empty_splits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        generate_mtfl(tmp_path, n_train=0, n_test=5)


def test_landmarks_match_the_drawing(generated: Path) -> None:
    """At full resolution the eye landmark sits on the dark iris flanked by the white of the eye; one
    eye-width off, it does not. Checked on frontal faces without glasses (whose frames may cover the eye)."""
    hits = misses_when_shifted = checked = 0
    for split in ("training", "testing"):
        for line in _lines(generated / f"{split}.txt"):
            fields = line.split()
            if fields[13] != "2" or fields[14] != "3":
                continue
            with Image.open(_image_of(generated, line)) as img:
                gray = np.asarray(img.convert("L"), dtype=np.float64)
            xs, ys = np.array(fields[1:6], float), np.array(fields[6:11], float)
            eye_dist = float(np.hypot(xs[1] - xs[0], ys[1] - ys[0]))
            for k in (0, 1):
                checked += 1
                hits += _dark_spot_between_bright(gray, xs[k], ys[k], eye_dist)
                misses_when_shifted += not _dark_spot_between_bright(gray, xs[k], ys[k] + 0.3 * eye_dist, eye_dist)
    assert checked >= 10
    assert hits >= 0.9 * checked
    assert misses_when_shifted >= 0.9 * checked
    # Nose tip between the eyes horizontally, mouth below the nose, on every frontal face.
    for line in _lines(generated / "training.txt"):
        fields = line.split()
        xs, ys = np.array(fields[1:6], float), np.array(fields[6:11], float)
        assert xs[0] < xs[1] and xs[3] < xs[4]
        if fields[14] == "3":
            assert xs[0] < xs[2] < xs[1]
            assert ys[2] < min(ys[3], ys[4])


def _dark_spot_between_bright(gray: np.ndarray, x: float, y: float, eye_dist: float) -> bool:
    def mean_at(px: float, py: float) -> float:
        c, r = round(px), round(py)
        return float(gray[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2].mean())

    center = mean_at(x, y)
    flank = 0.14 * eye_dist
    return center + 40 < min(mean_at(x - flank, y), mean_at(x + flank, y))


def test_glasses_are_learnable_from_40x40_pixels(tmp_path: Path) -> None:
    root = generate_mtfl(tmp_path / "MTFL", n_train=400, n_test=150, seed=5, workers=1)
    train, test = read_mtfl(root, "training", cache=False), read_mtfl(root, "testing", cache=False)
    x, xt = train.x.reshape(len(train), -1), test.x.reshape(len(test), -1)
    mu, sd = x.mean(0), x.std(0) + 1e-3
    x, xt = (x - mu) / sd, (xt - mu) / sd
    y, yt = train.targets["glasses"], test.targets["glasses"]
    onehot = np.eye(2)[y]
    weights = np.linalg.solve(x.T @ x + 300.0 * np.eye(x.shape[1]), x.T @ (onehot - onehot.mean(0)))
    accuracy = float((np.argmax(xt @ weights + onehot.mean(0), axis=1) == yt).mean())
    majority = float(np.bincount(yt).max() / len(yt))
    assert accuracy >= max(0.7, majority + 0.1), (accuracy, majority)


def _mouth_at_40x40(seed: int, smiling: bool) -> tuple[float, float]:
    """Width (between the corners) and how far the ink lies below the corners, in pixels of the 40×40
    grayscale image, of one mouth drawn on the smallest frontal face the generator draws (flat skin)."""
    skin = (200, 160, 140)
    rh = 0.18 * 250
    head = synthetic_mtfl._Head(cx=125.0, cy=110.0, r=0.75 * rh, rh=rh, yaw=0.0, roll=0.0)
    image = Image.new("RGB", (250, 250), skin)
    corners = synthetic_mtfl._draw_mouth(ImageDraw.Draw(image), np.random.default_rng(seed), head, skin, smiling)
    small = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    ink = np.abs(np.asarray(small, dtype=np.float64) - float(small.getpixel((2, 2)))).sum(axis=1)
    scale = IMAGE_SIZE / 250
    (x0, y0), (x1, y1) = corners
    centroid = float((ink * (np.arange(IMAGE_SIZE) + 0.5)).sum() / ink.sum())
    return (x1 - x0) * scale, centroid - (y0 + y1) / 2 * scale


def test_smile_is_visible_at_40x40() -> None:
    # A smile is wider and open below lifted corners; a neutral mouth is a narrower line at its corners.
    smiles = [_mouth_at_40x40(seed, True) for seed in range(12)]
    neutral = [_mouth_at_40x40(seed, False) for seed in range(12)]
    assert min(w for w, _ in smiles) > max(w for w, _ in neutral) + 0.8, (smiles, neutral)
    assert min(d for _, d in smiles) > max(d for _, d in neutral) + 0.5, (smiles, neutral)


# ---------------------------------------------------------------------------------------------------
# Reader on hand-written files
# ---------------------------------------------------------------------------------------------------


def test_hand_written_annotation(tmp_path: Path) -> None:
    root = tmp_path / "MTFL"
    root.mkdir()
    # 250×250 half black / half white; 200×120 uniform gray; 90×150 RGB.
    half = np.zeros((250, 250), dtype=np.uint8)
    half[:, 125:] = 255
    (root / "lfw_5590").mkdir()
    Image.fromarray(half).convert("RGB").save(root / "lfw_5590" / "Aaron_Eckhart_0001.jpg", quality=100)
    _write_image(root / "net_7876" / "_40_1154_0.jpg", (200, 120), (128, 128, 128))
    _write_image(root / "AFLW" / "0001-image20056.jpg", (90, 150), (200, 10, 10))
    (root / "training.txt").write_text(
        " lfw_5590\\Aaron_Eckhart_0001.jpg 107.25 147.75 126.25 106.25 140.75"
        " 108.75 113.25 143.75 158.75 162.75 1 2 2 3\r\n"
        "\n"
        "net_7876\\_40_1154_0.jpg   50 150 100 60 140 40 40 70 100 100 2 1 1 5\n"
        "\tAFLW\\0001-image20056.jpg 30 60 45 35 55 50 50 75 100 100 1 1 2 1\n"
    )
    data = read_mtfl(root, "training", cache=False)
    assert len(data) == 3
    lm = data.targets["landmarks"]
    np.testing.assert_allclose(
        lm[0], np.array([107.25, 147.75, 126.25, 106.25, 140.75, 108.75, 113.25, 143.75, 158.75, 162.75]) * 0.16
    )
    np.testing.assert_allclose(lm[1], [10, 30, 20, 12, 28, 40 / 3, 40 / 3, 70 / 3, 100 / 3, 100 / 3], rtol=1e-6)
    np.testing.assert_allclose(
        lm[2], [40 / 3, 80 / 3, 20, 140 / 9, 220 / 9, 40 / 3, 40 / 3, 20, 80 / 3, 80 / 3], rtol=1e-6
    )
    assert data.targets["gender"].tolist() == [0, 1, 0]
    assert data.targets["smile"].tolist() == [1, 0, 0]
    assert data.targets["glasses"].tolist() == [1, 0, 1]
    assert data.targets["pose"].tolist() == [2, 4, 0]
    assert data.x[0, 0, :, :18].max() < 0.05 and data.x[0, 0, :, 22:].min() > 0.95
    np.testing.assert_allclose(data.x[1], 128 / 255, atol=2 / 255)
    red_gray = (200 * 299 + 10 * 587 + 10 * 114) / 1000 / 255  # ITU-R 601-2 luma, as Pillow's convert("L")
    np.testing.assert_allclose(data.x[2], red_gray, atol=4 / 255)
    assert read_mtfl(root, "training", normalize_landmarks=True, cache=False).targets["landmarks"].max() <= 1.0


# ---------------------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------------------


def _error(root: Path, split: str = "training") -> DataError:
    with pytest.raises(DataError) as info:
        read_mtfl(root, split, cache=False)
    return info.value


def test_missing_root(tmp_path: Path) -> None:
    err = _error(tmp_path / "nowhere")
    assert err.path == str(tmp_path / "nowhere") and "does not exist" in str(err)


def test_missing_annotation_file(tmp_path: Path) -> None:
    root = _mini_root(tmp_path, [GOOD])
    err = _error(root, "testing")
    assert err.path == str(root / "testing.txt") and "testing.txt" in err.problem and "missing" in err.problem


def test_empty_annotation_file(tmp_path: Path) -> None:
    root = _mini_root(tmp_path, ["", "   "])
    err = _error(root)
    assert err.path == str(root / "training.txt") and "empty" in err.problem


def test_wrong_field_count(tmp_path: Path) -> None:
    root = _mini_root(tmp_path, [GOOD, GOOD.rsplit(" ", 1)[0]])
    err = _error(root)
    assert err.path == str(root / "training.txt")
    assert "line 2" in err.problem and "15 fields" in err.problem and "got 14" in err.problem


def test_non_numeric_coordinate(tmp_path: Path) -> None:
    root = _mini_root(tmp_path, [GOOD.replace("126.25", "12x.25")])
    err = _error(root)
    assert err.path == str(root / "training.txt")
    assert "line 1" in err.problem and "x3 (nose)" in err.problem and "'12x.25'" in err.problem


@pytest.mark.parametrize(
    ("tail", "name", "allowed"),
    [(" 1 2 2 6", "pose = 6", "1..5"), (" 3 2 2 3", "gender = 3", "1..2"), (" 1 0 2 3", "smile = 0", "1..2")],
)
def test_attribute_out_of_range(tmp_path: Path, tail: str, name: str, allowed: str) -> None:
    root = _mini_root(tmp_path, [GOOD, GOOD[: -len(tail)] + tail])
    err = _error(root)
    assert err.path == str(root / "training.txt")
    assert "line 2" in err.problem and name in err.problem and allowed in err.problem


def test_non_integer_attribute(tmp_path: Path) -> None:
    root = _mini_root(tmp_path, [GOOD[:-1] + "x"])
    err = _error(root)
    assert "line 1" in err.problem and "pose is not an integer" in err.problem


def test_missing_image(tmp_path: Path) -> None:
    root = _mini_root(tmp_path, [GOOD, GOOD.replace("_0001", "_0002")])
    err = _error(root)
    assert err.path == str(root / "lfw_5590" / "Aaron_Eckhart_0002.jpg")
    assert "does not exist" in err.problem and "line 2 of training.txt" in err.problem


def test_image_path_outside_root(tmp_path: Path) -> None:
    root = _mini_root(tmp_path, [GOOD.replace("lfw_5590\\", "..\\")])
    err = _error(root)
    assert "line 1" in err.problem and "not inside" in err.problem


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image(tmp_path: Path, damage: str) -> None:
    root = _mini_root(tmp_path, [GOOD])
    image = root / "lfw_5590" / "Aaron_Eckhart_0001.jpg"
    data = image.read_bytes()
    image.write_bytes(b"this is not a JPEG" if damage == "garbage" else data[: len(data) // 2])
    err = _error(root)
    assert err.path == str(image) and "corrupt" in err.problem and "line 1 of training.txt" in err.problem


def test_first_bad_image_in_file_order_is_reported(tmp_path: Path) -> None:
    lines = [GOOD] * 20 + [GOOD.replace("_0001", "_0002"), GOOD.replace("_0001", "_0003")]
    root = _mini_root(tmp_path, lines)
    (root / "lfw_5590" / "Aaron_Eckhart_0002.jpg").write_bytes(b"\xff\xd8 broken")
    err = _error(root)
    assert err.path == str(root / "lfw_5590" / "Aaron_Eckhart_0002.jpg") and "line 21 of" in err.problem


def test_invalid_arguments(tmp_path: Path) -> None:
    root = _mini_root(tmp_path, [GOOD])
    with pytest.raises(ValueError, match="split"):
        read_mtfl(root, "validation")
    with pytest.raises(ValueError, match="size"):
        read_mtfl(root, size=0)


# ---------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("images decoded although a valid cache exists")

    monkeypatch.setattr(mtfl, "_load_image", fail)


def _cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("mtfl-*.npz"))


def test_cache_hit_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = generate_mtfl(tmp_path / "MTFL", n_train=8, n_test=2, seed=1, workers=1)
    first = read_mtfl(root, "training")
    files = _cache_files(root / ".fedgradnorm_cache")
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o644

    with monkeypatch.context() as patch:
        _forbid_decoding(patch)
        cached = read_mtfl(root, "training")
        np.testing.assert_array_equal(cached.x, first.x)
        for task in TASKS:
            np.testing.assert_array_equal(cached.targets[task], first.targets[task])
            assert cached.targets[task].dtype == first.targets[task].dtype
        normalized = read_mtfl(root, "training", normalize_landmarks=True)
        np.testing.assert_allclose(normalized.targets["landmarks"], first.targets["landmarks"] / 40)

        annotation = root / "training.txt"
        stat = annotation.stat()
        os.utime(annotation, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        with pytest.raises(AssertionError, match="decoded"):
            read_mtfl(root, "training")

    again = read_mtfl(root, "training")
    np.testing.assert_array_equal(again.x, first.x)
    new_files = _cache_files(root / ".fedgradnorm_cache")
    assert len(new_files) == 1 and new_files != files  # the stale file was replaced


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    root = generate_mtfl(tmp_path / "MTFL", n_train=5, n_test=2, seed=2, workers=1)
    first = read_mtfl(root, "training")
    (cache_file,) = _cache_files(root / ".fedgradnorm_cache")
    cache_file.write_bytes(b"PK\x03\x04 not really a zip")
    rebuilt = read_mtfl(root, "training")
    np.testing.assert_array_equal(rebuilt.x, first.x)
    assert np.load(cache_file)["pixels"].shape == (5, 1, 40, 40)


def test_cache_dir_from_environment_and_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = generate_mtfl(tmp_path / "MTFL", n_train=4, n_test=2, seed=4, workers=1)
    env_dir = tmp_path / "cache"
    monkeypatch.setenv("FEDGRADNORM_CACHE_DIR", str(env_dir))
    read_mtfl(root, "testing")
    assert len(_cache_files(env_dir)) == 1
    assert not (root / ".fedgradnorm_cache").exists()
    with monkeypatch.context() as patch:
        _forbid_decoding(patch)
        read_mtfl(root, "testing")

    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("FEDGRADNORM_CACHE_DIR", str(blocked))
    read_mtfl(root, "training")  # the unusable folder is skipped: the cache goes beside the annotation file
    assert len(_cache_files(root / ".fedgradnorm_cache")) == 1


def test_no_cache_writes_nothing(tmp_path: Path) -> None:
    root = generate_mtfl(tmp_path / "MTFL", n_train=3, n_test=2, seed=5, workers=1)
    read_mtfl(root, "training", cache=False)
    assert not (root / ".fedgradnorm_cache").exists()
