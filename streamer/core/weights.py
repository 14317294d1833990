"""Model weights as a value: serialized, checked, averaged (pure tensors, no transport).

Workers that share what they learn (serving/sharing.py) exchange their forecaster's weights
as bytes. Reading those bytes never unpickles: ``torch.load(weights_only=True)`` and then a
check that the result is a flat ``{name: tensor}`` of exactly our names, shapes and dtypes,
all finite. Averages are taken in the order the caller gives, so workers that hold the same
entries in the same order compute bitwise the same average.
"""

from __future__ import annotations

import io
import warnings
import zipfile

import torch

from streamer.core import snapshot as snap

Weights = dict[str, torch.Tensor]


class WeightsError(ValueError):
    """Bytes that are not weights this model can use (garbage, another shape, non-finite)."""


def dumps(weights: Weights) -> bytes:
    """Serialize (CPU tensors) to bytes; ``loads`` reads them back without unpickling."""
    return snap.dumps({name: t.detach().to("cpu") for name, t in weights.items()})


def loads(data: bytes, like: Weights) -> Weights:
    """Weights from ``dumps`` bytes, checked against ``like`` (names, shapes, dtypes, dense
    tensors) and for finite values, on ``like``'s device; WeightsError if anything else."""
    try:
        _check_archive(data)
        with warnings.catch_warnings():  # a peer's odd bytes are counted, not warned about
            warnings.simplefilter("ignore")
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return _checked(loaded, like)
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable payload is the same verdict
        raise WeightsError(f"not readable as this model's weights: {type(exc).__name__}") \
            from None


def _check_archive(data: bytes) -> None:
    """What ``dumps`` writes: a zip of stored (uncompressed) entries, so nothing in it unpacks
    larger than the bytes themselves. A deflated entry of a record under the size limit can
    unpack to a gigabyte (measured: 973 KB -> 954 MB, on the serving thread) before any check
    of names or shapes; a legacy (non-zip) file declares its storages' sizes itself."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = archive.infolist()
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries):
        raise WeightsError("not this model's weights: compressed entries")
    if sum(e.file_size for e in entries) > len(data):
        raise WeightsError("not this model's weights: entries larger than the record")


def _checked(loaded, like: Weights) -> Weights:
    if not isinstance(loaded, dict) or set(loaded) != set(like):
        raise WeightsError("not this model's parameters (names differ)")
    out = {}
    for name, reference in like.items():
        t = loaded[name]
        if (not isinstance(t, torch.Tensor) or t.layout != torch.strided
                or t.device.type != "cpu" or t.shape != reference.shape
                or t.dtype != reference.dtype):
            raise WeightsError(f"parameter {name!r} has another shape, type or layout")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WeightsError(f"parameter {name!r} holds non-finite values")
        out[name] = t.detach().to(reference.device)  # a peer's requires_grad is no graph here
    return out


def weighted_average(entries: list[tuple[Weights, float]]) -> Weights:
    """sum(w_i * W_i) / sum(w_i) in the given order; equal weights when every w_i is 0."""
    if not entries:
        raise ValueError("nothing to average")
    total = sum(weight for _, weight in entries)
    if total <= 0:
        entries, total = [(w, 1.0) for w, _ in entries], float(len(entries))
    names = entries[0][0].keys()
    return {name: sum((w[name] * (weight / total) for w, weight in entries[1:]),
                      entries[0][0][name] * (entries[0][1] / total))
            for name in names}


def rebased(current: Weights, base: Weights, target: Weights) -> Weights:
    """``target`` plus what ``current`` learned since ``base``: target + (current - base)."""
    return {name: target[name] + (current[name] - base[name]) for name in target}


def distance(a: Weights, b: Weights) -> float:
    """Global L2 norm of a - b over every parameter."""
    return float(torch.sqrt(sum(((a[n] - b[n]).double() ** 2).sum() for n in a)))


def copied(weights: Weights, device: torch.device | str | None = None) -> Weights:
    """A copy that shares no memory with ``weights`` (on ``device`` when given)."""
    return {name: t.detach().to(device, copy=True) if device is not None else t.detach().clone()
            for name, t in weights.items()}
