"""Where a training set comes from: one registry keyed by the form of ``train.dataset``.

=================  ==========================================  ==================================
source kind        ``train.dataset``                           arrays
=================  ==========================================  ==================================
``builtin``        ``mnist1d``, ``digits``, ``linreg``,        generated or read offline
                   ``text``                                    (:mod:`cbs.train.data`)
``npz``            ``path/to/file.npz``                        ``x_train, y_train, x_val, y_val``
                                                               or ``x, y`` (split by the options)
``npy_folder``     ``path/to/folder`` holding ``.npy`` files   the same names, memory-mapped
``parquet``        ``path/to/file.parquet``                    columns (``dataset_args.x``/``y``),
                                                               optional ``split`` column
``hf_disk``        a ``datasets`` ``save_to_disk`` folder      splits ``train`` + ``validation``
                                                               (or ``val``/``test``), or one split
``factory``        ``pkg.module:function`` (or                 whatever it returns: a mapping of
                   ``path/file.py:function``)                  the array names, a tuple, a
                                                               :class:`~cbs.train.data.Dataset`
                                                               or a ``datasets`` object
=================  ==========================================  ==================================

Every source ends in :func:`from_arrays`, which validates (same lengths, same example
shape in both splits, numeric, finite, labels in range), infers the task when
``train.task`` is ``auto`` (integer labels: classification, or LM when labels are integer
sequences shaped like the inputs; float labels: regression), and hashes the four arrays
into the manifest. Every problem is raised as a :class:`~cbs.sweep.schema.ConfigError`
naming the config key, what was found and what is expected, while the config is
validated, before anything is written or computed. Relative paths are relative to the
working directory (like ``output.dir``). Nothing is downloaded: a Hugging Face folder is
read with ``datasets.load_from_disk``.

Memory-mapped arrays (a ``.npy`` folder with explicit splits) stay on disk until the back
end decides: if the training set fits the device budget it is copied to the device,
otherwise batches are gathered from the map per compiled chunk (:mod:`cbs.train.streaming`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cbs.errors import ConfigError
from cbs.train import data as data_mod
from cbs.train.data import Dataset

__all__ = ["SOURCES", "Source", "source_kind", "load", "from_arrays", "import_object", "BUILTIN"]

BUILTIN = ("mnist1d", "digits", "linreg", "text")
SPLIT_NAMES = ("x_train", "y_train", "x_val", "y_val")
KEY = "train.dataset"
ARGS = "train.dataset_args"
_ROWS = 1 << 16  # rows per piece when hashing / checking memory-mapped arrays


@dataclasses.dataclass(frozen=True)
class Source:
    """One way to name a data set: ``matches(name)`` decides, ``load(name, section)`` reads."""

    kind: str
    doc: str
    matches: Callable[[str], bool]
    load: Callable[[str, Any], Dataset]
    args: tuple[str, ...] = ()  # the dataset_args keys it reads (None-checked; factory: any)


# ---------------------------------------------------------------------------------- helpers
def _hash(*arrays: np.ndarray) -> str:
    """sha256 over (dtype, shape, bytes) of each array; equals :func:`cbs.train.data._hash`
    but reads memory-mapped arrays piece by piece."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{np.dtype(a.dtype).str}{tuple(a.shape)}".encode())
        for i in range(0, max(a.shape[0], 1), _ROWS):
            h.update(np.ascontiguousarray(a[i : i + _ROWS]).tobytes())
    return h.hexdigest()


def _first_nonfinite(a: np.ndarray) -> int | None:
    if not np.issubdtype(a.dtype, np.inexact):
        return None
    for i in range(0, a.shape[0], _ROWS):
        piece = np.asarray(a[i : i + _ROWS])
        bad = ~np.isfinite(piece.reshape(piece.shape[0], -1)).all(axis=1)
        if bad.any():
            return i + int(np.argmax(bad))
    return None


def _show_keys(keys) -> str:
    return "[" + ", ".join(sorted(map(str, keys))) + "]"


def _path(name: str) -> Path:
    return Path(os.path.expanduser(name))


def _args(section, allowed: tuple[str, ...], kind: str) -> dict:
    args = dict(section.dataset_args or {})
    for k in args:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            raise ConfigError(
                f"{ARGS}.{k}",
                args[k],
                f"a {kind} source reads only these keys: " + (", ".join(allowed) or "none"),
                f"did you mean {close[0]!r}?" if close else "",
            )
    return args


# -------------------------------------------------------------------------- array -> Dataset
def from_arrays(
    name: str, arrays: Mapping[str, Any], section, info: Mapping | None = None, key: str = KEY
) -> Dataset:
    """A validated :class:`Dataset` from ``x_train, y_train, x_val, y_val`` or ``x, y``.

    ``x, y`` are split by ``train.val_fraction`` / ``train.split_seed``; ``train.max_train``
    keeps the first training examples. Memory-mapped inputs stay memory-mapped when no
    split is needed. ``key`` is the config key named in errors.
    """
    keys = set(arrays)
    info = dict(info or {})
    if set(SPLIT_NAMES) <= keys:
        xt, yt, xv, yv = (arrays[k] for k in SPLIT_NAMES)
        split = "given"
    elif {"x", "y"} <= keys:
        split = "val_fraction"
        xt = yt = xv = yv = None
    else:
        raise ConfigError(
            key,
            name,
            "expected arrays x_train, y_train, x_val, y_val (or x, y plus the split "
            f"options); found {_show_keys(keys)}",
        )
    names = SPLIT_NAMES if split == "given" else ("x", "y")
    for k in names:
        a = arrays[k]
        if not isinstance(a, np.ndarray):
            try:
                a = np.asarray(a)
            except Exception as e:  # noqa: BLE001 - any conversion failure is the user's input
                raise ConfigError(
                    key, name, f"array {k} must be convertible to a NumPy array ({e})"
                ) from None
        if a.ndim == 0 or a.dtype.kind not in "biuf":
            raise ConfigError(
                key,
                name,
                f"array {k} must be numeric (bool, int or float) with examples along "
                f"axis 0; found dtype {a.dtype}, shape {a.shape}",
            )
        arrays = {**arrays, k: a}
    if split == "val_fraction":
        x, y = arrays["x"], arrays["y"]
        if x.shape[0] != y.shape[0]:
            raise ConfigError(
                key,
                name,
                f"x and y need the same number of examples; found {x.shape[0]} and {y.shape[0]}",
            )
        if x.shape[0] < 2:
            raise ConfigError(
                key, name, f"at least 2 examples are needed to split; found {x.shape[0]}"
            )
        xt, yt, xv, yv = data_mod._split(
            x, y, section.val_fraction, section.split_seed, section.max_train
        )
        # before train.max_train, which may not ask for more than this
        info["num_train_available"] = int(x.shape[0] - xv.shape[0])
        info.update(val_fraction=section.val_fraction, split_seed=section.split_seed)
    else:
        xt, yt, xv, yv = (arrays[k] for k in SPLIT_NAMES)
        for x, y, part in ((xt, yt, "train"), (xv, yv, "val")):
            if x.shape[0] != y.shape[0]:
                raise ConfigError(
                    key,
                    name,
                    f"x_{part} and y_{part} need the same number of examples; found "
                    f"{x.shape[0]} and {y.shape[0]}",
                )
            if x.shape[0] == 0:
                raise ConfigError(key, name, f"x_{part} is empty; expected at least one example")
        for a, b, what in ((xt, xv, "x"), (yt, yv, "y")):
            if a.shape[1:] != b.shape[1:]:
                raise ConfigError(
                    key,
                    name,
                    f"{what}_train and {what}_val need the same example shape; found "
                    f"{a.shape[1:]} and {b.shape[1:]}",
                )
        info["num_train_available"] = int(xt.shape[0])
        if section.max_train is not None:
            xt, yt = xt[: section.max_train], yt[: section.max_train]
    for a, what in ((xt, "x_train"), (yt, "y_train"), (xv, "x_val"), (yv, "y_val")):
        bad = _first_nonfinite(a)
        if bad is not None:
            raise ConfigError(
                key, name, f"every value must be finite; found a NaN or inf in {what}[{bad}]"
            )
    task, yt, yv, num_outputs = _task(name, section, xt, yt, xv, yv, key)
    info.update(
        num_train=int(xt.shape[0]),
        num_val=int(xv.shape[0]),
        split=split,
        shapes=dict(x=list(xt.shape[1:]), y=list(yt.shape[1:])),
        dtypes=dict(x=str(xt.dtype), y=str(yt.dtype)),
        task=task,
    )
    return Dataset(name, task, xt, yt, xv, yv, num_outputs, _hash(xt, yt, xv, yv), info)


def _task(name, section, xt, yt, xv, yv, key):
    """(task, y_train, y_val, num_outputs) from ``train.task`` or inferred from the labels."""
    task = section.task
    integral = yt.dtype.kind in "biu"
    if task == "auto":
        if not integral:
            task = "regression"
        elif yt.ndim == 2 and xt.dtype.kind in "iu" and yt.shape == xt.shape:
            task = "lm"
        else:
            task = "classification"
    if task in ("classification", "lm"):
        if not integral:
            whole = all(np.array_equal(np.asarray(a), np.round(np.asarray(a))) for a in (yt, yv))
            if not whole:
                raise ConfigError(
                    "train.task",
                    task,
                    f"{task} needs integer labels; found {yt.dtype} labels with "
                    f"fractional values in {name}",
                )
        if task == "classification" and yt.ndim != 1:
            raise ConfigError(
                key,
                name,
                f"classification labels must be one integer per example (shape (n,)); "
                f"found y shape {yt.shape}",
                "for sequences of tokens set train.task: lm",
            )
        if task == "lm" and yt.ndim != 2:
            raise ConfigError(
                key,
                name,
                f"lm labels must be token sequences (shape (n, seq_len)); found y shape {yt.shape}",
            )
        lo = min(int(np.min(yt)), int(np.min(yv)))
        hi = max(int(np.max(yt)), int(np.max(yv)))
        if task == "lm" and xt.dtype.kind in "iu":
            hi = max(hi, int(np.max(xt)), int(np.max(np.asarray(xv))))
        n_out = section.num_outputs or hi + 1
        if lo < 0 or hi >= n_out:
            raise ConfigError(
                key,
                name,
                f"{'labels' if task == 'classification' else 'tokens'} must lie in "
                f"[0, {n_out}) (train.num_outputs); found values in [{lo}, {hi}]",
            )
        if n_out < 2:
            raise ConfigError(
                key, name, f"{task} needs at least 2 classes; found labels all equal to {hi}"
            )
        return task, yt.astype(np.int32, copy=False), yv.astype(np.int32, copy=False), int(n_out)
    # regression: targets are vectors, one row per example
    if yt.ndim == 1:
        yt, yv = yt.reshape(-1, 1), yv.reshape(-1, 1)
    n_out = int(np.prod(yt.shape[1:]))
    if section.num_outputs is not None and section.num_outputs != n_out:
        raise ConfigError(
            "train.num_outputs",
            section.num_outputs,
            f"regression targets of {name} have {n_out} values per example",
        )
    if not np.issubdtype(yt.dtype, np.floating):
        yt, yv = yt.astype(np.float32), yv.astype(np.float32)
    return "regression", yt, yv, n_out


# ---------------------------------------------------------------------------- the sources
_DEFAULT_SAMPLES = {"mnist1d": 5000, "linreg": 4096}


def _builtin(name: str, section) -> Dataset:
    """The section's keys mapped onto the built-in loader's arguments (the dispatch by
    name is ``data.load_dataset``)."""
    _args(section, (), "built-in")
    kw = dict(
        val_fraction=section.val_fraction,
        split_seed=section.split_seed,
        max_train=section.max_train,
    )
    if name in _DEFAULT_SAMPLES:
        kw["num_samples"] = section.num_samples or _DEFAULT_SAMPLES[name]
    if name == "linreg":
        kw.update(
            dim=section.linreg_dim,
            spectrum_power=section.spectrum_power,
            label_noise=section.label_noise,
            data_seed=section.data_seed,
        )
    elif name == "text":
        kw.update(seq_len=section.seq_len)
    return data_mod.load_dataset(name, **kw)


def _exists(name: str, what: str) -> Path:
    p = _path(name)
    if not p.exists():
        raise ConfigError(
            KEY,
            name,
            f"expected {what}; no such file or folder (relative paths start at the "
            f"working directory {os.getcwd()})",
        )
    return p


def _rename(arrays: dict, args: dict) -> dict:
    """Applies dataset_args.x / .y renames (array names or columns) to x, y."""
    out = dict(arrays)
    for std in ("x", "y"):
        src = args.get(std)
        if src is not None and src != std:
            for suffix in ("", "_train", "_val"):
                if f"{src}{suffix}" in arrays:
                    out[f"{std}{suffix}"] = arrays[f"{src}{suffix}"]
    return out


def _npz(name: str, section) -> Dataset:
    args = _args(section, ("x", "y"), "npz")
    p = _exists(name, "an .npz file")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - a corrupt file is the user's input
        raise ConfigError(
            KEY, name, f"expected a readable .npz file; reading it raised {type(e).__name__}: {e}"
        ) from None
    return from_arrays(
        name, _rename(arrays, args), section, dict(source="npz", path=str(p.resolve()))
    )


def _is_hf_folder(p: Path) -> bool:
    return (p / "dataset_dict.json").exists() or (p / "state.json").exists()


def _npy_folder(name: str, section) -> Dataset:
    args = _args(section, ("x", "y"), "npy folder")
    p = _exists(name, "a folder of .npy files")
    arrays = {}
    for f in sorted(p.glob("*.npy")):
        try:
            arrays[f.stem] = np.load(f, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                KEY, name, f"expected readable .npy files; {f.name} raised {type(e).__name__}: {e}"
            ) from None
    if not arrays:
        raise ConfigError(
            KEY,
            name,
            "expected a folder with x_train.npy, y_train.npy, x_val.npy, y_val.npy (or "
            "x.npy, y.npy), a Hugging Face save_to_disk folder, or a file; found no .npy files",
        )
    return from_arrays(
        name,
        _rename(arrays, args),
        section,
        dict(source="npy_folder", path=str(p.resolve()), memory_mapped=True),
    )


def _column(table, col: str, name: str, where: str) -> np.ndarray:
    import pyarrow as pa

    if col not in table.column_names:
        raise ConfigError(
            where,
            col,
            f"expected a column of {name}; found columns {_show_keys(table.column_names)}",
        )
    arr = table.column(col).combine_chunks()
    dims = []
    while (
        pa.types.is_list(arr.type)
        or pa.types.is_large_list(arr.type)
        or pa.types.is_fixed_size_list(arr.type)
    ):
        lengths = np.asarray(
            arr.value_lengths()
            if not pa.types.is_fixed_size_list(arr.type)
            else np.full(len(arr), arr.type.list_size)
        )
        if len(lengths) and (lengths != lengths[0]).any():
            raise ConfigError(
                where,
                col,
                f"list column {col!r} of {name} needs one length per nesting level; found "
                f"lengths {sorted(set(lengths.tolist()))[:5]}",
            )
        dims.append(int(lengths[0]) if len(lengths) else 0)
        arr = arr.flatten()
    if arr.null_count:
        raise ConfigError(
            where,
            col,
            f"column {col!r} of {name} has {arr.null_count} missing values; expected none",
        )
    values = arr.to_numpy(zero_copy_only=False)
    n = table.num_rows
    return values.reshape(n, *dims)


def _parquet(name: str, section) -> Dataset:
    args = _args(section, ("x", "y", "x_shape", "split"), "parquet")
    p = _exists(name, "a .parquet file")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            KEY,
            name,
            f"expected a readable Parquet file; reading it raised {type(e).__name__}: {e}",
        ) from None
    cols = table.column_names
    y_col = args.get("y") or next((c for c in ("y", "label", "labels", "target") if c in cols), "y")
    split_col = args.get("split", "split")
    x_spec = args.get("x")
    if x_spec is None:
        x_spec = "x" if "x" in cols else [c for c in cols if c not in (y_col, split_col)]
    y = _column(table, y_col, name, f"{ARGS}.y")
    if isinstance(x_spec, str):
        x = _column(table, x_spec, name, f"{ARGS}.x")
    else:
        if not x_spec:
            raise ConfigError(
                f"{ARGS}.x", x_spec, f"expected feature columns; {name} has only {_show_keys(cols)}"
            )
        parts = [_column(table, c, name, f"{ARGS}.x") for c in x_spec]
        x = (
            np.stack([a.reshape(a.shape[0], -1) for a in parts], axis=1).reshape(table.num_rows, -1)
            if any(a.ndim > 1 for a in parts)
            else np.stack(parts, axis=1)
        )
    if args.get("x_shape") is not None:
        shape = tuple(args["x_shape"])
        if int(np.prod(shape)) != int(np.prod(x.shape[1:])):
            raise ConfigError(
                f"{ARGS}.x_shape",
                list(shape),
                f"expected a shape with {int(np.prod(x.shape[1:]))} "
                f"values per example (the features of {name})",
            )
        x = x.reshape(x.shape[0], *shape)
    info = dict(source="parquet", path=str(p.resolve()), x=x_spec, y=y_col)
    if split_col in cols:
        s = np.asarray(table.column(split_col).to_pylist(), dtype=object)
        tr = s == "train"
        va = np.isin(s, ["val", "validation", "test"])
        if not tr.any() or not va.any() or not (tr | va).all():
            raise ConfigError(
                KEY,
                name,
                f"column {split_col!r} must hold 'train' and 'val' (or 'validation', "
                f"'test') only; found {sorted(set(s.tolist()))[:6]}",
            )
        return from_arrays(
            name,
            dict(x_train=x[tr], y_train=y[tr], x_val=x[va], y_val=y[va]),
            section,
            dict(info, split_column=split_col),
        )
    return from_arrays(name, dict(x=x, y=y), section, info)


def hf_arrays(obj, name: str, args: Mapping, where: str = KEY) -> dict:
    """Arrays from a ``datasets.Dataset`` or ``DatasetDict`` (columns x / y by name)."""
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        splits = {k: obj[k] for k in obj}
        val_name = next((k for k in ("validation", "val", "test") if k in splits), None)
        if "train" in splits and val_name:
            parts = {"train": splits["train"], "val": splits[val_name]}
        elif len(splits) == 1:
            parts = {"": next(iter(splits.values()))}
        else:
            raise ConfigError(
                where,
                name,
                "expected splits 'train' and 'validation' (or 'val', 'test'), or a "
                f"single split; found {_show_keys(splits)}",
            )
    elif isinstance(obj, datasets.Dataset):
        parts = {"": obj}
    else:
        raise ConfigError(
            where, name, f"expected a datasets.Dataset or DatasetDict; found {type(obj).__name__}"
        )
    first = next(iter(parts.values()))
    cols = first.column_names
    x_col = args.get("x") or next(
        (c for c in ("x", "image", "pixel_values", "input_ids", "features") if c in cols), None
    )
    y_col = args.get("y") or next(
        (c for c in ("y", "label", "labels", "target") if c in cols), None
    )
    if x_col not in cols or y_col not in cols:
        missing = "x" if x_col not in cols else "y"
        raise ConfigError(
            f"{ARGS}.{missing}",
            x_col if missing == "x" else y_col,
            f"expected a column of {name}; found columns {_show_keys(cols)}",
        )
    out = {}
    for part, ds in parts.items():
        suffix = f"_{part}" if part else ""
        ds = ds.with_format("numpy")
        try:
            out[f"x{suffix}"] = np.asarray(ds[x_col])
            out[f"y{suffix}"] = np.asarray(ds[y_col])
        except Exception as e:  # noqa: BLE001 - ragged columns etc.
            raise ConfigError(
                where,
                name,
                f"columns {x_col!r} and {y_col!r} must convert to fixed-shape numeric "
                f"arrays; converting raised {type(e).__name__}: {e}",
            ) from None
    return out


def _hf_disk(name: str, section) -> Dataset:
    args = _args(section, ("x", "y"), "Hugging Face folder")
    p = _exists(name, "a Hugging Face save_to_disk folder")
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            KEY,
            name,
            "reading a Hugging Face folder needs the optional package datasets "
            "(pip install 'cbs[hf]')",
        ) from None
    try:
        obj = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            KEY,
            name,
            f"expected a datasets save_to_disk folder; loading it raised {type(e).__name__}: {e}",
        ) from None
    return from_arrays(
        name,
        hf_arrays(obj, name, args),
        section,
        dict(source="hf_disk", path=str(p.resolve()), datasets_version=datasets.__version__),
    )


def import_object(spec: str, key: str):
    """The object ``"pkg.module:name"`` (the working directory is on the import path) or
    ``"path/to/file.py:name"``; a ConfigError naming ``key`` otherwise."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(key, spec, "expected 'pkg.module:name' or 'path/to/file.py:name'")
    try:
        if module_name.endswith(".py"):
            path = _path(module_name)
            if not path.exists():
                raise ConfigError(
                    key, spec, f"expected an existing Python file; {path} does not exist"
                )
            mod_id = "cbs_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            module = sys.modules.get(mod_id)
            if module is None:
                loader = importlib.util.spec_from_file_location(mod_id, path)
                module = importlib.util.module_from_spec(loader)
                sys.modules[mod_id] = module
                try:
                    loader.loader.exec_module(module)
                except BaseException:
                    del sys.modules[mod_id]
                    raise
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except ModuleNotFoundError as e:
        raise ConfigError(
            key,
            spec,
            f"expected an importable module (from the working directory or the Python path); {e}",
        ) from None
    except Exception as e:  # noqa: BLE001 - the user's module failed to import
        raise ConfigError(
            key,
            spec,
            f"expected an importable module; importing it raised {type(e).__name__}: {_short(e)}",
        ) from None
    if not hasattr(module, attr):
        close = difflib.get_close_matches(
            attr, [n for n in dir(module) if not n.startswith("_")], n=1
        )
        raise ConfigError(
            key,
            spec,
            f"module {module_name!r} has no attribute {attr!r}",
            f"did you mean {close[0]!r}?" if close else "",
        )
    return getattr(module, attr)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _factory(name: str, section) -> Dataset:
    fn = import_object(name, KEY)
    if not callable(fn):
        raise ConfigError(
            KEY, name, f"expected a callable returning arrays; found {type(fn).__name__}"
        )
    kwargs = dict(section.dataset_args or {})
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(
            ARGS, kwargs, f"expected keyword arguments accepted by {name}: {e}"
        ) from None
    except ValueError:
        pass  # no signature (builtins): let the call decide
    try:
        out = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's factory failed
        raise ConfigError(
            KEY,
            name,
            f"expected the factory to return arrays; calling it raised "
            f"{type(e).__name__}: {_short(e)}",
        ) from None
    info = dict(source="factory", factory=name, kwargs={k: repr(v) for k, v in kwargs.items()})
    if isinstance(out, Dataset):
        arrays = dict(x_train=out.x_train, y_train=out.y_train, x_val=out.x_val, y_val=out.y_val)
        info["factory_info"] = {
            k: v for k, v in out.info.items() if isinstance(v, (int, float, str, bool))
        }
    elif isinstance(out, Mapping):
        arrays = dict(out)
    elif isinstance(out, tuple) and len(out) in (2, 4):
        arrays = dict(zip(("x", "y") if len(out) == 2 else SPLIT_NAMES, out))
    elif type(out).__module__.startswith("datasets"):
        arrays = hf_arrays(out, name, {})
    else:
        raise ConfigError(
            KEY,
            name,
            "expected the factory to return a mapping with x_train, y_train, x_val, "
            "y_val (or x, y), a tuple of those arrays, a cbs.train.data.Dataset or a datasets "
            f"object; found {type(out).__name__}",
        )
    return from_arrays(name, arrays, section, info)


def _is_factory(name: str) -> bool:
    module, sep, attr = name.rpartition(":")
    return bool(sep and module and attr.isidentifier() and not Path(name).exists())


def _suffix(*suffixes: str) -> Callable[[str], bool]:
    return lambda name: not _is_factory(name) and name.lower().endswith(suffixes)


def _folder(hf: bool) -> Callable[[str], bool]:
    return lambda name: _path(name).is_dir() and _is_hf_folder(_path(name)) == hf


SOURCES: dict[str, Source] = {
    s.kind: s
    for s in (
        Source(
            "builtin",
            "generated or shipped: " + ", ".join(BUILTIN),
            lambda n: n in BUILTIN,
            _builtin,
        ),
        Source(
            "factory",
            "'pkg.module:function' or 'file.py:function' with train.dataset_args as keywords",
            _is_factory,
            _factory,
        ),
        Source(
            "npz",
            ".npz with x_train, y_train, x_val, y_val (or x, y)",
            _suffix(".npz"),
            _npz,
            ("x", "y"),
        ),
        Source(
            "parquet",
            ".parquet with columns x (or several), y, optional split",
            _suffix(".parquet", ".pq"),
            _parquet,
            ("x", "y", "x_shape", "split"),
        ),
        Source(
            "hf_disk",
            "a Hugging Face datasets save_to_disk folder",
            _folder(True),
            _hf_disk,
            ("x", "y"),
        ),
        Source(
            "npy_folder",
            "a folder of .npy files (x_train.npy, ... or x.npy, y.npy), memory-mapped",
            _folder(False),
            _npy_folder,
            ("x", "y"),
        ),
    )
}


def source_kind(name: str) -> str:
    """The registry entry that reads ``train.dataset = name``; a ConfigError if none does."""
    for kind, src in SOURCES.items():
        if src.matches(name):
            return kind
    looks_like_path = any(c in name for c in "/\\.") or _path(name).suffix
    if looks_like_path:
        _exists(
            name,
            "a .npz or .parquet file, a folder of .npy files or a Hugging Face save_to_disk folder",
        )
        raise ConfigError(
            KEY,
            name,
            "expected a .npz or .parquet file, a folder of .npy files or a Hugging Face "
            "save_to_disk folder",
        )
    close = difflib.get_close_matches(name, BUILTIN, n=1)
    raise ConfigError(
        KEY,
        name,
        "allowed: " + ", ".join(repr(b) for b in BUILTIN) + ", a path (.npz, .parquet, "
        "a folder of .npy files, a Hugging Face save_to_disk folder) or 'pkg.module:function'",
        f"did you mean {close[0]!r}?" if close else "",
    )


_DATA_FIELDS = (
    "dataset",
    "dataset_args",
    "task",
    "num_outputs",
    "val_fraction",
    "split_seed",
    "max_train",
    "num_samples",
    "data_seed",
    "linreg_dim",
    "spectrum_power",
    "label_noise",
    "seq_len",
)
_CACHE: dict[tuple, Dataset] = {}


def _cache_key(section) -> tuple:
    fields = tuple((f, repr(getattr(section, f, None))) for f in _DATA_FIELDS)
    p = _path(section.dataset)
    stamp = ()
    if p.exists():
        files = [p] + (sorted(p.rglob("*")) if p.is_dir() else [])
        stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return fields + stamp


def load(section) -> Dataset:
    """The validated data set of a ``train:`` section (cached: the config check and the back
    end read it once; a file that changes on disk is read again)."""
    key = _cache_key(section)
    if key not in _CACHE:
        kind = source_kind(section.dataset)
        ds = SOURCES[kind].load(section.dataset, section)
        _CACHE.clear()  # one data set per process is the common case; do not hold several
        _CACHE[key] = dataclasses.replace(ds, info={"source_kind": kind, **ds.info})
    return _CACHE[key]
