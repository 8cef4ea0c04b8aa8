"""sglp_engine: the SGLP compute engine (all-pairs CKA, Fisher segmentation, layer-pruning decision) in Python.

The numbers come from the same Rust code as the ``sglp-engine`` CLI: the streaming ``CkaAccumulator``, Fisher's
exact segmentation and the pruning decision of ``prune``. Activations are read in place: a C-contiguous NumPy array
(or a CPU PyTorch tensor, through ``tensor.numpy()``) of f32, f64, f16 or bf16 is handed to the engine by address,
never copied; the GIL is released while the engine computes.

    >>> import numpy as np, sglp_engine
    >>> acts = {f"layer{i}": np.random.default_rng(i).standard_normal((512, 64), dtype=np.float32) for i in range(4)}
    >>> res = sglp_engine.cka(acts, batch_size=128)
    >>> res.cka.shape
    (4, 4)
    >>> seg = sglp_engine.segment(res, k=2)

Errors are Python exceptions with the CLI's one-line messages: ``ValueError`` for bad input, ``OSError`` for
files, ``RuntimeError`` when CUDA was asked for and cannot run. Where the CLI names the input file, these messages
name the input ``acts``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native

__all__ = [
    "cka",
    "CkaAccumulator",
    "CkaResult",
    "segment",
    "Segments",
    "plan",
    "Plan",
    "CopyWarning",
    "__version__",
]

__version__: str = _native.__version__


class CopyWarning(UserWarning):
    """An input could not be read in place and was copied once (non-contiguous, big-endian, or on a GPU)."""


# ----------------------------------------------------------------------------------------------------------------
# Arrays in

# NumPy float dtypes by item size; bf16 arrives from PyTorch as raw 16-bit words (NumPy has no bfloat16).
_FLOATS = {2: "f16", 4: "f32", 8: "f64"}


def _torch_module():
    """PyTorch if the caller has imported it (we never import it ourselves: it is optional and slow to load)."""
    return sys.modules.get("torch")


def _torch_to_numpy(name: str, t) -> Tuple[np.ndarray, Optional[str]]:
    """A PyTorch tensor as a NumPy array sharing its memory, and the engine dtype when NumPy cannot name it (bf16).

    A CUDA tensor that the CUDA backend cannot read in place (another device than the accumulator's, a CPU
    backend, non-contiguous, or mixed with host arrays in one update) is copied to the host once, with a
    ``CopyWarning``.
    """
    torch = _torch_module()
    t = t.detach()
    if t.device.type != "cpu":
        warnings.warn(
            f"layer '{name}': {t.device} tensor copied to host memory once (the CUDA backend reads CUDA "
            f"tensors in place only when every layer of the update is a contiguous tensor on its device)",
            CopyWarning,
            stacklevel=4,
        )
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy(), "bf16"
    if t.dtype in (torch.float16, torch.float32, torch.float64):
        return t.numpy(), None
    # Let the engine reject it with its message; a zero-size stand-in carries the shape (nothing is read).
    return np.empty(tuple(t.shape), dtype=np.uint8), str(t.dtype).replace("torch.", "")


_TORCH_GPU_DTYPES = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}


def _cuda_tensors_in_place(named: List[Tuple[str, Any]], cuda_device: Optional[int]):
    """``(name, device address, shape, dtype)`` per layer when every layer is a C-contiguous CUDA tensor of a
    float dtype on the accumulator's CUDA device, after synchronising the stream that wrote them: the CUDA
    backend then reads them in place. None otherwise (the arrays go through the host, copied once with a
    ``CopyWarning`` when they are on a GPU)."""
    torch = _torch_module()
    if torch is None or cuda_device is None or not named:
        return None
    out = []
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.device.type != "cuda" or t.device.index != cuda_device:
            return None
        dt = _TORCH_GPU_DTYPES.get(str(t.dtype).replace("torch.", ""))
        if dt is None or not t.is_contiguous():
            return None
        out.append((name, t.detach(), dt))
    # Every stream of the device, not only the current one: a tensor may have been written on a side stream.
    torch.cuda.synchronize(cuda_device)
    return [(n, t.data_ptr(), list(t.shape), dt) for n, t, dt in out]


def _layer_array(name: str, x: Any) -> Tuple[np.ndarray, str]:
    """One layer as a C-contiguous, native-endian NumPy array the engine reads in place, and its engine dtype.

    Non-contiguous or big-endian input is copied once, with a ``CopyWarning`` (strided reads would slow every
    kernel; one copy is cheaper).
    """
    torch = _torch_module()
    engine_dtype = None
    if torch is not None and isinstance(x, torch.Tensor):
        arr, engine_dtype = _torch_to_numpy(name, x)
    else:
        arr = np.asarray(x)
    if engine_dtype is None:
        is_float = arr.dtype.kind == "f" and arr.dtype.itemsize in _FLOATS
        engine_dtype = _FLOATS[arr.dtype.itemsize] if is_float else str(arr.dtype)
        if not is_float:
            return arr, engine_dtype  # rejected by the engine before it reads anything
    if not arr.flags.c_contiguous or not arr.dtype.isnative:
        warnings.warn(
            f"layer '{name}': array is not C-contiguous and native-endian; copied once",
            CopyWarning,
            stacklevel=4,
        )
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    return arr, engine_dtype


def _named(acts: Any, layers: Optional[Sequence[str]]) -> List[Tuple[str, Any]]:
    """``acts`` (a dict name → array, or a list of arrays) as (name, array) pairs in layer order."""
    if isinstance(acts, Mapping):
        if layers is None:
            return [(str(k), v) for k, v in acts.items()]
        missing = [n for n in layers if n not in acts]
        extra = [str(k) for k in acts if k not in set(layers)]
        if missing or extra:
            raise ValueError(
                f"acts: layers {sorted(map(str, acts))} do not match the accumulator's {list(layers)}"
            )
        return [(n, acts[n]) for n in layers]
    if isinstance(acts, (list, tuple)):
        names = list(layers) if layers is not None else [f"layer{i}" for i in range(len(acts))]
        if len(names) != len(acts):
            raise ValueError(f"acts: {len(acts)} arrays for {len(names)} layers")
        return list(zip(names, acts))
    raise ValueError(f"acts must be a dict name → array or a list of arrays (got {type(acts).__name__})")


def _matrix(rows: List[List[Optional[float]]]) -> np.ndarray:
    """An L×L JSON matrix (``null`` for NaN) as float64."""
    return np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=np.float64).reshape(
        len(rows), len(rows)
    )


# ----------------------------------------------------------------------------------------------------------------
# CKA


class CkaResult:
    """All-pairs CKA of the layers: the ``sglp-cka/1`` result of the CLI's ``cka``.

    Attributes: ``layers`` (names), ``cka`` and ``hsic`` (float64 L×L NumPy arrays, NaN where undefined),
    ``n_samples``, ``n_batches``, ``batch_size``, ``estimator``, ``kernel``, ``route``, ``backend``, ``warnings``.
    """

    def __init__(self, text: str):
        self._text = text
        d = json.loads(text)
        self.layers: List[str] = d["layers"]
        self.cka: np.ndarray = _matrix(d["cka"])
        self.hsic: np.ndarray = _matrix(d["hsic"])
        self.n_samples: int = d["n_samples"]
        self.n_batches: int = d["n_batches"]
        self.batch_size: int = d["batch_size"]
        self.estimator: str = d["estimator"]
        self.kernel: Dict[str, Any] = d["kernel"]
        self.route: str = d["route"]
        self.backend: str = d["backend"]
        self.warnings: List[str] = d["warnings"]

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        """Write the ``sglp-cka/1`` JSON (the bytes ``sglp-engine cka --out`` writes), atomically."""
        _native.write_text(os.fspath(path), self._text)

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "CkaResult":
        """Read an ``sglp-cka/1`` JSON written by ``to_json`` or the CLI."""
        with open(path, encoding="utf-8") as f:
            return cls(f.read())

    def __repr__(self) -> str:
        return (
            f"CkaResult({len(self.layers)} layers, {self.n_samples} samples, {self.n_batches} batches, "
            f"{self.estimator}, {self.backend})"
        )


class CkaAccumulator:
    """Streaming all-pairs CKA: ``update`` with chunks of rows of every layer, then ``finish``.

    Chunks may have any number of rows; they are re-batched into estimator batches exactly as the CLI streams
    its input shards, so the result equals ``cka`` on the concatenated rows. Memory does not grow with the number
    of updates (the unbiased estimator keeps an L×L sum and at most one partial batch).

    ``layers``: the layer names, fixing their order (default: the first update's dict order, or ``layer0..``).
    ``tokens``: how 3-D ``[sequences, tokens, hidden]`` arrays become matrices: ``"samples"`` (every token is a
    sample) or ``"features"`` (tokens flattened into features), as the CLI's ``--tokens``.
    ``route``: ``"auto"``, ``"gram"`` or ``"feature"`` (linear kernel formulation). ``threads``: CPU threads (0:
    one per core). ``device``: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    """

    def __init__(
        self,
        layers: Optional[Sequence[str]] = None,
        estimator: str = "unbiased",
        batch_size: int = 256,
        kernel: str = "linear",
        device: str = "auto",
        *,
        rbf_threshold: float = 1.0,
        tokens: str = "samples",
        route: str = "auto",
        threads: int = 0,
        _n_samples_hint: Optional[int] = None,
    ):
        self._layers = list(layers) if layers is not None else None
        self._native = _native.Accumulator(
            estimator,
            _count(batch_size, "batch_size"),
            kernel,
            float(rbf_threshold),
            route,
            device,
            _count(threads, "threads"),
            tokens,
            _n_samples_hint,
        )

    @property
    def backend(self) -> str:
        """The compute device in use, e.g. ``cpu (2 threads)``."""
        return self._native.backend

    @property
    def note(self) -> Optional[str]:
        """Why ``device="auto"`` runs on the CPU, when it does."""
        return self._native.note

    def update(self, acts: Union[Mapping[str, Any], Sequence[Any]]) -> None:
        """Add the same rows of every layer (NumPy arrays or PyTorch tensors, ``[rows, ...]``)."""
        named = _named(acts, self._layers)
        on_gpu = _cuda_tensors_in_place(named, self._native.cuda_device)
        if on_gpu is not None:
            # `named` holds every tensor until the engine has read it.
            self._native.update_device(on_gpu)
            if self._layers is None:
                self._layers = [n for n, _ in named]
            return
        arrays = [(n, *_layer_array(n, x)) for n, x in named]
        # `arrays` holds every array until the engine has read it.
        self._native.update([(n, a.__array_interface__["data"][0], list(a.shape), dt) for n, a, dt in arrays])
        if self._layers is None:
            self._layers = [n for n, _ in named]

    def finish(self) -> CkaResult:
        """The CKA of everything pushed so far; the accumulator cannot be updated afterwards."""
        return CkaResult(self._native.finish())


def _count(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{what} must be a non-negative integer (got {v!r})")
    return int(v)


def cka(
    acts: Union[Mapping[str, Any], Sequence[Any]],
    estimator: str = "unbiased",
    batch_size: int = 256,
    kernel: str = "linear",
    rbf_threshold: float = 1.0,
    device: str = "auto",
    tokens: str = "samples",
    *,
    route: str = "auto",
    threads: int = 0,
) -> CkaResult:
    """All-pairs CKA of the layers in ``acts``: a dict name → array, or a list of arrays (named ``layer0..``).

    Each array is ``[n, ...]`` (axis 0 samples, the other axes flattened into features; 3-D arrays follow
    ``tokens``), f32/f64/f16/bf16, a NumPy array or a PyTorch tensor. ``estimator``: ``"unbiased"`` (minibatch
    HSIC₁ over batches of ``batch_size`` samples, averaged; Nguyen et al. 2021) or ``"biased"`` (HSIC₀ over all
    samples; Kornblith et al. 2019). ``kernel``: ``"linear"`` or ``"rbf"`` (bandwidth ``rbf_threshold`` × the
    median distance). The arrays are read in place (see the module docstring).
    """
    named = _named(acts, None)
    n = None
    if named:
        shape = np.shape(named[0][1]) if not hasattr(named[0][1], "shape") else tuple(named[0][1].shape)
        n = int(np.prod(shape[:2])) if (len(shape) == 3 and tokens == "samples") else (shape[0] if shape else None)
    acc = CkaAccumulator(
        [k for k, _ in named],
        estimator,
        batch_size,
        kernel,
        device,
        rbf_threshold=rbf_threshold,
        tokens=tokens,
        route=route,
        threads=threads,
        _n_samples_hint=n,
    )
    acc.update(dict(named))
    return acc.finish()


# ----------------------------------------------------------------------------------------------------------------
# Segmentation


class Segments:
    """Fisher's optimal segmentation of the layers (the ``sglp-segments/1`` result of the CLI's ``segment``).

    ``k``; ``segments``: inclusive ``(start, end)`` layer-index pairs; ``segment_layers``: their names;
    ``loss_curve``: the optimal loss for k = 1..; ``loss``: that of the chosen k; ``features``.
    """

    def __init__(self, text: str):
        self._text = text
        d = json.loads(text)
        self.k: int = d["k"]
        self.segments: List[Tuple[int, int]] = [tuple(s) for s in d["segments"]]
        self.segment_layers: List[List[str]] = d["segment_layers"]
        self.loss_curve: np.ndarray = np.asarray(d["loss_curve"], dtype=np.float64)
        self.loss: float = d["loss"]
        self.features: str = d["features"]

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        """Write the ``sglp-segments/1`` JSON, atomically."""
        _native.write_text(os.fspath(path), self._text)

    def __repr__(self) -> str:
        return f"Segments(k={self.k}, segments={self.segments})"


def _square(matrix: Any, layers: Optional[Sequence[str]]) -> Tuple[List[str], np.ndarray]:
    """A similarity matrix (a CkaResult or anything NumPy reads as L×L) and its layer names."""
    if isinstance(matrix, CkaResult):
        return list(layers) if layers is not None else matrix.layers, matrix.cka
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"the similarity matrix must be square (got shape {list(m.shape)})")
    names = list(layers) if layers is not None else [f"layer{i}" for i in range(m.shape[0])]
    return names, m


def _k(k: Union[int, str]) -> str:
    return str(int(k)) if isinstance(k, (int, np.integer)) and not isinstance(k, bool) else str(k)


def segment(
    matrix: Any,
    k: Union[int, str] = "auto",
    k_max: int = 8,
    threshold: float = 0.05,
    features: str = "colsum",
    min_len: int = 1,
    layers: Optional[Sequence[str]] = None,
) -> Segments:
    """Fisher's exact optimal segmentation of the ordered layers by a similarity matrix.

    ``matrix``: a ``CkaResult`` or a square array. ``k``: a number of segments, ``"auto"`` (the largest k+1 whose
    relative loss gain exceeds ``threshold``, k ≤ ``k_max``) or ``"elbow"``. ``features``: ``"colsum"`` (each
    layer's column sum, as SGLP) or ``"rows"`` (each layer's row). ``min_len``: fewest layers per segment.
    """
    names, m = _square(matrix, layers)
    return Segments(
        _native.segment(
            names, m.tolist(), _k(k), _count(k_max, "k_max"), float(threshold), features, _count(min_len, "min_len")
        )
    )


# ----------------------------------------------------------------------------------------------------------------
# Pruning plan


class Plan:
    """Which layers to remove: SGLP's segments and per-segment allocation, then the lowest gradient norms.

    ``removed`` / ``removed_layers``: indices / names of the layers to remove; ``kept``; ``segments`` (inclusive
    pairs); ``removed_per_segment``; ``k``; ``loss_curve``; ``gradnorm``; ``cka`` (the ``CkaResult``);
    ``warnings``. ``report(out_dir)`` draws the pictures and the HTML page, as ``prune`` does.
    """

    def __init__(self, text: str):
        self._text = text
        d = json.loads(text)
        self.layers: List[str] = d["layers"]
        self.removed: List[int] = d["removed"]
        self.removed_layers: List[str] = d["removed_layers"]
        self.kept: List[int] = d["kept"]
        self.segments: List[Tuple[int, int]] = [tuple(s) for s in d["segments"]]
        self.removed_per_segment: List[int] = d["removed_per_segment"]
        self.k: int = d["k"]
        self.loss_curve: np.ndarray = np.asarray([v for _, v in d["loss_curve"]], dtype=np.float64)
        self.allocation: str = d["allocation"]
        self.gradnorm: np.ndarray = np.asarray(d["gradnorm"], dtype=np.float64)
        self.warnings: List[str] = d["warnings"]
        self.cka = CkaResult(json.dumps(d["cka"]))

    def report(self, out_dir: Union[str, os.PathLike]) -> None:
        """Write ``sglp-report.json``, the CKA heat map, gradient-norm bars and loss-curve PNGs, and
        ``sglp-report.html`` into ``out_dir`` (created if missing)."""
        os.makedirs(out_dir, exist_ok=True)
        _native.write_plan_report(self._text, os.fspath(out_dir))

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        """Write the plan as ``sglp-prune-report/2`` JSON, atomically."""
        _native.write_text(os.fspath(path), self._text)

    def __repr__(self) -> str:
        return f"Plan(remove {self.removed_layers}, segments={self.segments})"


def _gradnorm_values(gradnorm: Any, layers: List[str]) -> List[float]:
    """Per-layer gradient norms in the CKA's layer order, from a dict, an array, or an ``sglp-gradnorm/1`` file."""
    if isinstance(gradnorm, (str, os.PathLike)):
        with open(gradnorm, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("format") != "sglp-gradnorm/1":
            raise ValueError(f"{os.fspath(gradnorm)}: not an sglp-gradnorm/1 file")
        gradnorm = dict(zip(d["layers"], d["gradnorm"]))
    if isinstance(gradnorm, Mapping):
        missing = [n for n in layers if n not in gradnorm]
        if missing:
            raise ValueError(f"gradnorm has no value for layer '{missing[0]}'")
        return [float(gradnorm[n]) for n in layers]
    g = np.asarray(gradnorm, dtype=np.float64)
    if g.ndim != 1:
        raise ValueError(f"gradnorm must be one value per layer (got shape {list(g.shape)})")
    return g.tolist()


def plan(
    cka_result: Union[CkaResult, str, os.PathLike],
    gradnorm: Any,
    remove: int,
    allocation: str = "proportional",
    *,
    k: Union[int, str] = "auto",
    k_max: int = 6,
    threshold: float = 0.05,
    features: str = "colsum",
    min_len: int = 1,
) -> Plan:
    """The layers to remove, decided as ``sglp-engine prune`` decides from a CKA and gradient norms.

    ``cka_result``: a ``CkaResult`` (or an ``sglp-cka/1`` file). ``gradnorm``: per-layer gradient norms, a dict
    name → value, an array in layer order, or an ``sglp-gradnorm/1`` file. ``remove``: layers to remove.
    ``allocation``: how the budget is split over the segments: ``"proportional"`` (∝ length, SGLP),
    ``"removable"`` (∝ length − 1), ``"adaptive"`` or ``"open"``. The segmentation defaults are SGLP's as
    published (column sums, the 5% rule, k ≤ 6; k is also kept ≤ L − remove); inside each segment the layers of
    lowest gradient norm go (``--selection gradnorm``).
    """
    if not isinstance(cka_result, CkaResult):
        cka_result = CkaResult.from_json(cka_result)
    values = _gradnorm_values(gradnorm, cka_result.layers)
    return Plan(
        _native.plan(
            cka_result._text,
            values,
            _count(remove, "remove"),
            allocation,
            _k(k),
            _count(k_max, "k_max"),
            float(threshold),
            features,
            _count(min_len, "min_len"),
        )
    )
