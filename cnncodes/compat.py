"""Provenance checks: are these codes the ones a model was trained on? (used by training and prediction)

This module never imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import CacheMismatchError


@dataclass(frozen=True)
class Difference:
    """One field where a model's training codes and other codes differ."""

    field: str
    model: Any
    codes: Any

    def __str__(self) -> str:
        return f"{self.field}: {_short(self.model)} (model) vs {_short(self.codes)} (codes)"


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


# spec fields that do not change a code (where a file lies, how fast it was computed)
_SPEC_IGNORED = frozenset({"path", "weights_path", "device", "batch_size", "num_workers", "workers", "created", "layers"})


_RECORD_FIELDS = ("alias", "node", "stage", "pool", "dim", "map_shape")


def _diff_dicts(a: Any, b: Any, prefix: str, out: list[Difference]) -> None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            if k in _SPEC_IGNORED:
                continue
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in a:
                out.append(Difference(name, None, b[k]))
            elif k not in b:
                out.append(Difference(name, a[k], None))
            else:
                _diff_dicts(a[k], b[k], name, out)
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff_dicts(x, y, f"{prefix}[{i}]", out)
        return
    if a != b:
        out.append(Difference(prefix, a, b))


def _as_record_dict(r) -> dict:
    if hasattr(r, "to_dict"):
        return r.to_dict()
    return dict(r)


def diff_extraction(sidecar_meta: Mapping, codes_records: Mapping[str, Any], codes_spec: Mapping) -> list[Difference]:
    """Every field where the codes a model was trained on differ from other codes.

    Parameters
    ----------
    sidecar_meta : mapping
        A model's sidecar (:func:`load_model`): ``layers``, ``records``, ``spec``.
    codes_records : mapping
        ``key -> LayerRecord`` (or its dict) of the codes to predict on. Compared by key
        when every model layer is there, else in order (so ``fc6`` codes offered as
        the model's ``fc7`` are named as such).
    codes_spec : mapping
        The extraction spec of those codes.

    Returns
    -------
    list of Difference
        Empty when compatible. Layer fields: ``layer[<key>].alias`` / ``node`` / ``stage`` /
        ``pool`` / ``dim`` / ``map_shape`` (then ``fingerprint`` when nothing else explains
        a difference); spec fields by dotted path (``weights.sha256``,
        ``preprocessing.crop``, ``dtype``...). Where a file lies and run settings
        (``path``, ``device``, ``batch_size``) are not compared.
    """
    out: list[Difference] = []
    model_layers = list(sidecar_meta.get("layers") or list((sidecar_meta.get("records") or {}).keys()))
    mrec = {k: _as_record_dict(v) for k, v in (sidecar_meta.get("records") or {}).items()}
    crec = {k: _as_record_dict(v) for k, v in codes_records.items()}
    if all(k in crec for k in model_layers):
        pairs = [(k, mrec.get(k, {}), crec[k]) for k in model_layers]
    elif len(crec) == len(model_layers):
        pairs = [(k, mrec.get(k, {}), c) for k, c in zip(model_layers, crec.values())]
        for (k, _, c), ck in zip(pairs, crec):
            if ck != k:
                out.append(Difference(f"layer[{k}].key", k, ck))
    else:
        missing = [k for k in model_layers if k not in crec]
        out.append(Difference("layers", model_layers, list(crec)))
        pairs = [(k, mrec.get(k, {}), crec[k]) for k in model_layers if k not in missing]
    for k, m, c in pairs:
        for f in _RECORD_FIELDS:
            mv, cv = m.get(f), c.get(f)
            if f == "map_shape":
                mv, cv = list(mv or []), list(cv or [])
            if mv != cv:
                out.append(Difference(f"layer[{k}].{f}", mv, cv))
    _diff_dicts(dict(sidecar_meta.get("spec") or {}), dict(codes_spec or {}), "", out)
    if not out:
        for k, m, c in pairs:
            if m.get("fingerprint") and c.get("fingerprint") and m["fingerprint"] != c["fingerprint"]:
                out.append(Difference(f"layer[{k}].fingerprint", m["fingerprint"], c["fingerprint"]))
    return out


def check_compatible(sidecar_meta: Mapping, codes_records: Mapping[str, Any], codes_spec: Mapping) -> None:
    """Refuse codes that were not extracted like the model's training codes.

    Widths are not enough: AlexNet's fc6 and fc7 are both 4096-D.

    Raises
    ------
    CacheMismatchError
        Listing every differing field (see :func:`diff_extraction`); the list is
        also in the exception's ``differences`` attribute.
    """
    diffs = diff_extraction(sidecar_meta, codes_records, codes_spec)
    if diffs:
        name = sidecar_meta.get("model_file", "the model")
        err = CacheMismatchError(
            f"The codes do not match those {name} was trained on ({len(diffs)} field(s) differ): "
            + "; ".join(str(d) for d in diffs)
            + ". Extract the codes with the model's spec, or train a model on these codes."
        )
        err.differences = diffs
        raise err
