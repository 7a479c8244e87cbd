"""Synthetic RadComDynamic: :func:`generate_radcom` writes the published format (see :mod:`fedgradnorm.data.radcom`).

The file has h5py's default HDF5 settings and float32 values (the published file's dtype is not
documented; GNU Radio, which made it, works in complex64); the values come from synthetic but physically
motivated waveforms. Each waveform is defined in continuous time and evaluated on a time grid that the
sample-rate offset warps. Time parameters are scaled so that the 12.8 µs window holds the structure that
tells the classes apart (real radar repetition intervals are milliseconds, and real audio is flat over
12.8 µs):

==========  ===============  =============================================  ===============================
modulation  signal           waveform                                       drawn per sample
==========  ===============  =============================================  ===============================
pulsed      4 radar classes  pulsed CW with 50 ns linear edges (see below)  width ±5 %, PRI ±3 %, timing
fmcw        Radar-Altimeter  sawtooth linear chirp, 4 MHz in 6.4 µs         sweep ±5 %, timing
bpsk        Satcom           ±1 symbols, raised cosine (roll-off 0.35),     symbols, symbol timing
                             1.25 MBd (8 samples per symbol)
amdsb       AM radio         full-carrier AM, 1 + μ·m(t)                    depth μ in 0.5..0.9, message
amssb       AM radio         upper sideband, suppressed carrier:            message
                             the analytic signal of m(t)
ask         short-range      on-off keying, raised cosine (roll-off 1.0),   bits (at least one on), timing
                             625 kb/s (16 samples per bit)
==========  ===============  =============================================  ===============================

The AM message m(t) is a sum of 3 tones of 30..300 kHz with random amplitudes and phases, scaled into
[-1, 1]; its analytic signal (for SSB) is the same sum of complex exponentials.

The four pulsed radar classes differ in pulse width, pulse repetition interval (PRI), duty cycle and
carrier offset from the tuned frequency:

==================  ============  ========  ======  ==============
signal              pulse width   PRI       duty    carrier offset
==================  ============  ========  ======  ==============
Air-Ground-MTI      0.3 µs        3.0 µs    10 %    −1.5 MHz
Airborne-detection  1.0 µs        4.0 µs    25 %    0 Hz
Airborne-range      0.5 µs        2.0 µs    25 %    +1.0 MHz
Ground mapping      2.5 µs        8.0 µs    31 %    +0.5 MHz
==================  ============  ========  ======  ==============

Every waveform gets a random phase and a receiver tuning error (normal, standard deviation 2 kHz). Then the
dynamic channel of the published set (GNU Radio's dynamic channel model), in its order:

1. sample-rate offset: a random walk of the rate deviation (standard deviation 0.05 Hz per sample, clipped
   at ±60 Hz, started uniformly in that range), applied by warping the sampling times;
2. carrier frequency offset: a random walk (0.05 Hz per sample, clipped at ±250 Hz), integrated to phase;
3. frequency-selective Rician fading: three paths with fractional delays [0.2, 0.3, 0.1] samples and
   magnitudes [1, 0.5, 0.5], each delayed by a 5-tap sinc filter and multiplied by its own fading process
   (K = 3, a line-of-sight term plus 5 sinusoids, maximum Doppler 2 Hz, started at a random time);
4. complex AWGN at the labeled SNR relative to that vector's power after the channel.

Finally each 256-float vector is scaled to unit root mean square (the mean of its 256 squares is 1). At
high SNR the classes are easy to tell apart; at −20 dB a vector is mostly noise, so the anomaly task
(SNR < −4 dB) is learnable from how much structure a vector holds. Generation is vectorized per
(modulation, signal, SNR) key and seeded from (seed, key) through :func:`zlib.crc32`, so a given seed always
writes the same values.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fedgradnorm.atomic import atomic_replace
from fedgradnorm.data.radcom import _VECTOR, N_IQ, PAIRS, SAMPLE_RATE, SAMPLES_PER_KEY, SNRS, _is_int

__all__ = ["generate_radcom"]


# --------------------------------------------------------------------------------------------------------
# Generator: waveforms
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PulsedRadar:
    width_s: float
    pri_s: float
    offset_hz: float


_PULSED: dict[str, _PulsedRadar] = {
    "Air-Ground-MTI": _PulsedRadar(width_s=0.3e-6, pri_s=3.0e-6, offset_hz=-1.5e6),
    "Airborne-detection": _PulsedRadar(width_s=1.0e-6, pri_s=4.0e-6, offset_hz=0.0),
    "Airborne-range": _PulsedRadar(width_s=0.5e-6, pri_s=2.0e-6, offset_hz=1.0e6),
    "Ground mapping": _PulsedRadar(width_s=2.5e-6, pri_s=8.0e-6, offset_hz=0.5e6),
}
_EDGE_S = 50e-9
_TUNING_STD_HZ = 2e3
_FMCW_PERIOD_S = 6.4e-6
_FMCW_SWEEP_HZ = 4e6
_BPSK_SYMBOL_S = 8 / SAMPLE_RATE
_BPSK_ROLLOFF = 0.35
_ASK_BIT_S = 16 / SAMPLE_RATE
_ASK_ROLLOFF = 1.0
_PULSE_SPAN = 4
_AM_TONES = 3
_AM_TONE_HZ = (30e3, 300e3)
_AM_DEPTH = (0.5, 0.9)

_Waveform = Callable[[np.random.Generator, np.ndarray], np.ndarray]


def _rows(rng: np.random.Generator, t: np.ndarray, low: float, high: float) -> np.ndarray:
    """One uniform draw per sample (row of ``t``), shaped to broadcast along time."""
    return rng.uniform(low, high, (t.shape[0], 1))


def _carrier(rng: np.random.Generator, t: np.ndarray, offset_hz: float = 0.0) -> np.ndarray:
    """A carrier at ``offset_hz`` plus the tuning error, with a random phase."""
    freq = offset_hz + rng.normal(0.0, _TUNING_STD_HZ, (t.shape[0], 1))
    phase = _rows(rng, t, 0.0, 2 * np.pi)
    return np.exp(1j * (2 * np.pi * freq * t + phase))


def _pulsed(radar: _PulsedRadar) -> _Waveform:
    def waveform(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
        width = radar.width_s * _rows(rng, t, 0.95, 1.05)
        pri = radar.pri_s * _rows(rng, t, 0.97, 1.03)
        tau = np.mod(t + pri * _rows(rng, t, 0.0, 1.0), pri)
        envelope = np.clip(tau / _EDGE_S, 0.0, 1.0) * np.clip((width - tau) / _EDGE_S, 0.0, 1.0)
        return envelope * _carrier(rng, t, radar.offset_hz)

    return waveform


def _fmcw(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    sweep = _FMCW_SWEEP_HZ * _rows(rng, t, 0.95, 1.05)
    tau = np.mod(t + _FMCW_PERIOD_S * _rows(rng, t, 0.0, 1.0), _FMCW_PERIOD_S)
    chirp = 2 * np.pi * (-sweep / 2 * tau + sweep / (2 * _FMCW_PERIOD_S) * tau**2)
    return np.exp(1j * chirp) * _carrier(rng, t)


def _raised_cosine(u: np.ndarray, rolloff: float) -> np.ndarray:
    """Raised-cosine pulse at ``u`` symbol periods from its centre, cut at ±_PULSE_SPAN periods."""
    x = 2 * rolloff * u
    singular = np.abs(np.abs(x) - 1.0) < 1e-9
    denominator = np.where(singular, 1.0, 1.0 - x**2)
    pulse = np.sinc(u) * np.cos(np.pi * rolloff * u) / denominator
    limit = np.pi / 4 * np.sinc(1 / (2 * rolloff))
    pulse = np.where(singular, limit, pulse)
    return np.where(np.abs(u) <= _PULSE_SPAN, pulse, 0.0)


def _symbol_train(
    rng: np.random.Generator,
    t: np.ndarray,
    symbol_s: float,
    rolloff: float,
    draw: Callable[[tuple[int, int]], np.ndarray],
) -> np.ndarray:
    """Sum of raised-cosine pulses carrying the symbols that ``draw`` makes, with a random symbol timing.

    ``draw`` receives the shape (samples, symbols); column ``j`` is the symbol centred at time
    ``(j - _PULSE_SPAN - 1) * symbol_s - start`` with ``start`` uniform in [0, symbol_s). Each time point
    sums only the 2 * _PULSE_SPAN + 1 pulses around it (the others are cut to zero).
    """
    columns = math.floor(float(t.max()) / symbol_s) + 2 * _PULSE_SPAN + 4
    symbols = draw((t.shape[0], columns))
    start = symbol_s * _rows(rng, t, 0.0, 1.0)
    position = (t + start) / symbol_s + _PULSE_SPAN + 1
    base = np.floor(position).astype(np.int64)
    train = np.zeros(t.shape)
    for lag in range(-_PULSE_SPAN, _PULSE_SPAN + 1):
        column = np.clip(base + lag, 0, columns - 1)
        train += _raised_cosine(position - column, rolloff) * np.take_along_axis(symbols, column, axis=1)
    return train


def _bpsk(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    def draw(shape: tuple[int, int]) -> np.ndarray:
        return rng.integers(0, 2, shape) * 2.0 - 1.0

    return _symbol_train(rng, t, _BPSK_SYMBOL_S, _BPSK_ROLLOFF, draw) * _carrier(rng, t)


def _ask(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    bits_in_window = round(N_IQ / SAMPLE_RATE / _ASK_BIT_S)
    inside = slice(_PULSE_SPAN + 2, _PULSE_SPAN + 1 + bits_in_window)  # bits centred inside the window

    def draw(shape: tuple[int, int]) -> np.ndarray:
        bits = rng.integers(0, 2, shape).astype(np.float64)
        dark = np.flatnonzero(bits[:, inside].sum(axis=1) == 0)
        width = inside.stop - inside.start
        bits[dark, inside.start + rng.integers(0, width, len(dark))] = 1.0
        return bits

    return _symbol_train(rng, t, _ASK_BIT_S, _ASK_ROLLOFF, draw) * _carrier(rng, t)


def _am_tones(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Analytic message: a sum of tones, scaled so the real message stays within [-1, 1]."""
    b = t.shape[0]
    freq = rng.uniform(*_AM_TONE_HZ, (b, _AM_TONES, 1))
    amp = rng.uniform(0.3, 1.0, (b, _AM_TONES, 1))
    phase = rng.uniform(0.0, 2 * np.pi, (b, _AM_TONES, 1))
    tones = amp * np.exp(1j * (2 * np.pi * freq * t[:, None, :] + phase))
    return tones.sum(axis=1) / amp.sum(axis=1)


def _amdsb(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    depth = _rows(rng, t, *_AM_DEPTH)
    return (1.0 + depth * _am_tones(rng, t).real) * _carrier(rng, t)


def _amssb(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    return _am_tones(rng, t) * _carrier(rng, t)


_WAVEFORMS: dict[tuple[str, str], _Waveform] = {
    ("amdsb", "AM radio"): _amdsb,
    ("amssb", "AM radio"): _amssb,
    ("ask", "short-range"): _ask,
    ("bpsk", "Satcom"): _bpsk,
    ("fmcw", "Radar-Altimeter"): _fmcw,
    **{("pulsed", signal): _pulsed(radar) for signal, radar in _PULSED.items()},
}


# --------------------------------------------------------------------------------------------------------
# Generator: dynamic channel
# --------------------------------------------------------------------------------------------------------

_SRO_STD_HZ = 0.05
_SRO_MAX_HZ = 60.0
_CFO_STD_HZ = 0.05
_CFO_MAX_HZ = 250.0
_PATH_DELAYS = np.array([0.2, 0.3, 0.1])
_PATH_MAGS = np.array([1.0, 0.5, 0.5])
_FIR_TAPS = 5
_HALF = _FIR_TAPS // 2
_RICIAN_K = 3.0
_SINUSOIDS = 5
_MAX_DOPPLER_HZ = 2.0
_FADING_START_S = 100.0


def _bounded_walk(rng: np.random.Generator, b: int, m: int, std: float, limit: float) -> np.ndarray:
    """[b, m] random walks started uniformly in [-limit, limit], clipped at ±limit."""
    start = rng.uniform(-limit, limit, (b, 1))
    return np.clip(start + np.cumsum(rng.normal(0.0, std, (b, m)), axis=1), -limit, limit)


def _sampling_times(rng: np.random.Generator, b: int) -> np.ndarray:
    """[b, N_IQ + 4] sampling times (s) from -2 samples on, spaced by the drifting sample rate."""
    m = N_IQ + 2 * _HALF
    ratio = 1.0 + _bounded_walk(rng, b, m, _SRO_STD_HZ, _SRO_MAX_HZ) / SAMPLE_RATE
    elapsed = np.concatenate([np.zeros((b, 1)), np.cumsum(ratio[:, :-1], axis=1)], axis=1)
    return (elapsed - _HALF) / SAMPLE_RATE


def _frequency_offset(rng: np.random.Generator, b: int, m: int) -> np.ndarray:
    freq = _bounded_walk(rng, b, m, _CFO_STD_HZ, _CFO_MAX_HZ)
    return np.exp(1j * 2 * np.pi * np.cumsum(freq, axis=1) / SAMPLE_RATE)


def _rician_fading(rng: np.random.Generator, b: int, duration_s: float) -> np.ndarray:
    """[b, paths, 2] Rician gains of unit mean power at the start and the end of the window.

    Each path is a line-of-sight term plus a sum of sinusoids, started at a random time. With a 2 Hz
    maximum Doppler a gain turns by less than 2e-4 rad in 12.8 µs, so between the two ends it is linear to
    rounding precision.
    """
    paths = len(_PATH_DELAYS)
    t = _FADING_START_S * rng.uniform(0.0, 1.0, (b, paths, 1)) + np.array([0.0, duration_s])
    los_angle = rng.uniform(0.0, 2 * np.pi, (b, paths, 1))
    los_phase = rng.uniform(0.0, 2 * np.pi, (b, paths, 1))
    los = np.exp(1j * (2 * np.pi * _MAX_DOPPLER_HZ * np.cos(los_angle) * t + los_phase))
    angle = rng.uniform(0.0, 2 * np.pi, (b, paths, _SINUSOIDS, 1))
    phase = rng.uniform(0.0, 2 * np.pi, (b, paths, _SINUSOIDS, 1))
    doppler = _MAX_DOPPLER_HZ * np.cos(angle)
    scatter = np.exp(1j * (2 * np.pi * doppler * t[:, :, None, :] + phase)).sum(axis=2) / math.sqrt(_SINUSOIDS)
    return math.sqrt(_RICIAN_K / (_RICIAN_K + 1)) * los + math.sqrt(1 / (_RICIAN_K + 1)) * scatter


def _multipath(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Sum of the fractionally delayed, faded paths of ``x`` [b, N_IQ + 4]: [b, N_IQ].

    Path ``p`` is delayed by a 5-tap sinc filter ``sinc(lag - delay_p)``, lags -2..2, and scaled by its
    magnitude and fading gain; the combined taps vary linearly from the start to the end of the window.
    """
    gains = _rician_fading(rng, x.shape[0], (N_IQ - 1) / SAMPLE_RATE)
    lags = np.arange(-_HALF, _HALF + 1)
    path_taps = _PATH_MAGS[:, None] * np.sinc(lags[None, :] - _PATH_DELAYS[:, None])
    first, last = gains[..., 0] @ path_taps, gains[..., 1] @ path_taps
    weight = np.linspace(0.0, 1.0, N_IQ)
    y = np.zeros((x.shape[0], N_IQ), np.complex128)
    for j, lag in enumerate(lags):
        taps = first[:, j : j + 1] + (last - first)[:, j : j + 1] * weight
        y += taps * x[:, _HALF - lag : _HALF - lag + N_IQ]
    return y


def _add_noise(rng: np.random.Generator, y: np.ndarray, snr_db: int) -> np.ndarray:
    power = np.mean(np.abs(y) ** 2, axis=1, keepdims=True)
    std = np.sqrt(power / 10 ** (snr_db / 10) / 2)
    return y + std * (rng.standard_normal(y.shape) + 1j * rng.standard_normal(y.shape))


def _normalized_iq(y: np.ndarray) -> np.ndarray:
    v = np.concatenate([y.real, y.imag], axis=1)
    return (v / np.sqrt(np.mean(v**2, axis=1, keepdims=True))).astype(np.float32)


def _key_rng(seed: int, modulation: str, signal: str, snr: int) -> np.random.Generator:
    digest = zlib.crc32(f"{modulation}|{signal}|{snr}".encode())
    return np.random.default_rng(np.random.SeedSequence([seed, digest]))


def _synthesize(seed: int, modulation: str, signal: str, snr: int, count: int) -> np.ndarray:
    """``count`` normalized float32 vectors [count, 256] of one (modulation, signal, snr) key."""
    rng = _key_rng(seed, modulation, signal, snr)
    t = _sampling_times(rng, count)
    x = _WAVEFORMS[(modulation, signal)](rng, t)
    x = x * _frequency_offset(rng, count, t.shape[1])
    y = _add_noise(rng, _multipath(rng, x), snr)
    return _normalized_iq(y)


# --------------------------------------------------------------------------------------------------------
# Generator: file
# --------------------------------------------------------------------------------------------------------


def generate_radcom(
    path: str | Path,
    *,
    samples_per_key: int = SAMPLES_PER_KEY,
    seed: int = 0,
    snrs: Iterable[int] = SNRS,
    pairs: Iterable[tuple[str, str]] = PAIRS,
) -> Path:
    """Write a synthetic RadComDynamic file of the published format to ``path`` and return the path.

    One float32 dataset of 256 values per sample at the root, named ``str((modulation, signal, snr,
    index))`` with ``index`` 0..samples_per_key-1, for every pair in ``pairs`` and SNR in ``snrs``. The
    same arguments always write the same values (and, as no timestamps are stored, the same bytes). The
    file is written to a temporary name beside ``path`` and renamed over it, so a failure leaves any
    previous file in place. Raises ``ValueError`` for bad arguments and ``OSError`` when writing fails.
    """
    path = Path(path)
    snr_list = _check_generator_args(samples_per_key, seed, snrs)
    pair_list = _check_pairs(pairs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_replace(path, durable=False) as tmp:
        with _write_errors(path):
            f = h5py.File(tmp, "w")  # the empty temporary is ours alone
        try:
            writer = _DatasetWriter(f)
            for modulation, signal in pair_list:
                for snr in snr_list:
                    vectors = _synthesize(seed, modulation, signal, snr, samples_per_key)
                    with _write_errors(path):
                        for index, vector in enumerate(vectors):
                            writer.add(str((modulation, signal, snr, index)), vector)
        finally:
            with _write_errors(path):
                f.close()
        writer.fill(tmp)
    return path


@contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """Turn h5py's RuntimeError for a failed write (a full disk, say) into an OSError naming ``path``."""
    try:
        yield
    except RuntimeError as err:
        raise OSError(f"{path}: cannot write the HDF5 file: {err}") from err


def _check_generator_args(samples_per_key: int, seed: int, snrs: Iterable[int]) -> list[int]:
    if not _is_int(samples_per_key) or samples_per_key < 1:
        raise ValueError(f"samples_per_key must be a positive int, got {samples_per_key!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    snr_list = list(snrs)
    if not snr_list or not all(_is_int(s) for s in snr_list) or len(set(snr_list)) != len(snr_list):
        raise ValueError(f"snrs must be distinct ints, at least one, got {snr_list!r}")
    return snr_list


def _check_pairs(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    pair_list: list[tuple[str, str]] = []
    for pair in pairs:
        known = next((p for p in PAIRS if p == tuple(pair)), None)
        if known is None:
            raise ValueError(f"no waveform for pair {pair!r}; known pairs: {list(PAIRS)!r}")
        pair_list.append(known)
    if not pair_list or len(set(pair_list)) != len(pair_list):
        raise ValueError(f"pairs must be distinct (modulation, signal) pairs, at least one, got {pair_list!r}")
    return pair_list


class _DatasetWriter:
    """Creates root datasets of 256 little-endian float32 through h5py's low-level API.

    Layout is contiguous (h5py's default), without fill values or object timestamps, and the storage of
    each dataset is allocated when it is created. Creating a dataset is HDF5's main per-object cost; rather
    than also paying for one ``H5Dwrite`` per dataset, the values are written after the file is closed, in
    one pass of plain writes at each dataset's file offset (the bytes HDF5 itself would write there for
    unfiltered contiguous storage), and two datasets are then read back through HDF5 as a check.
    """

    def __init__(self, f: h5py.File) -> None:
        self._root = f.id
        self._space = h5py.h5s.create_simple((_VECTOR,))
        self._type = h5py.h5t.py_create(np.dtype("<f4"))
        self._dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        self._dcpl.set_layout(h5py.h5d.CONTIGUOUS)
        self._dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        self._dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        self._dcpl.set_obj_track_times(False)
        self._lcpl = h5py.h5p.create(h5py.h5p.LINK_CREATE)
        self._lcpl.set_char_encoding(h5py.h5t.CSET_UTF8)
        self._pending: list[tuple[int, str, bytes]] = []

    def add(self, name: str, vector: np.ndarray) -> None:
        values = np.ascontiguousarray(vector, dtype="<f4")
        dsid = h5py.h5d.create(
            self._root, name.encode("utf-8"), self._type, self._space, dcpl=self._dcpl, lcpl=self._lcpl
        )
        offset = dsid.get_offset()
        if offset is None:
            dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, values)
        else:
            self._pending.append((offset, name, values.tobytes()))

    def fill(self, file: Path) -> None:
        """Write the values of the datasets added so far into the closed ``file``, then check two of them."""
        if not self._pending:
            return
        with open(file, "r+b") as fh:
            for offset, _, values in sorted(self._pending):
                fh.seek(offset)
                fh.write(values)
        with h5py.File(file, "r") as f:
            for _, name, values in (self._pending[0], self._pending[-1]):
                if f[name][()].astype("<f4").tobytes() != values:
                    raise RuntimeError(f"{file}: dataset {name!r} does not read back as written")
