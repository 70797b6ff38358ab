"""Restricted unpicklers for legacy checkpoints: data comes out, code never runs.

A pickle can name any importable callable and call it (``os.system`` included). These
unpicklers resolve only an explicit allowlist of globals: numpy array reconstruction,
builtin containers, torch's tensor rebuild functions (the same set ``weights_only=True``
accepts) and a few safe local re-implementations. Classes from known training frameworks
(Lightning hyper-parameters, argparse namespaces, Haiku/optax/BYOL state) become *inert
stand-ins*: objects that record their arguments and state but have no behaviour. Any other
global is refused with :class:`UnsafeCheckpointError` before it is called.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import keyword
import logging
import pickle
import types
from pathlib import Path
from typing import Any

import numpy as np

from medxfer.models.errors import CheckpointError, UnsafeCheckpointError

log = logging.getLogger(__name__)


class Inert(dict):
    """A stand-in for a framework class: records constructor args and pickled state only."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        obj = super().__new__(cls)
        obj.__dict__["args"] = args
        obj.__dict__["items"] = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # never runs foreign code
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def append(self, item: Any) -> None:
        self.__dict__["items"].append(item)

    def extend(self, items: Any) -> None:
        self.__dict__["items"].extend(items)

    def __repr__(self) -> str:
        return f"<inert {type(self).__qualname__}>"


def _inert_class(module: str, name: str) -> type:
    return type(name, (Inert,), {"__module__": f"medxfer.inert.{module}", "__qualname__": name})


def _safe_namedtuple(name: str, fieldnames: Any, modulename: str = "", defaults: Any = None) -> type:
    """dill's by-value namedtuple, rebuilt locally from validated identifiers only."""
    fields = tuple(fieldnames)
    for f in (name, *fields):
        if not isinstance(f, str) or not f.isidentifier() or keyword.iskeyword(f):
            raise UnsafeCheckpointError(f"invalid namedtuple name {f!r} in pickle")
    return collections.namedtuple(name, fields)


_DILL_TYPES: dict[str, type] = {
    t.__name__: t for t in (tuple, list, dict, set, frozenset, int, float, complex, str, bytes, bool)
}


def _dill_load_type(name: str) -> type:
    if name not in _DILL_TYPES:
        raise UnsafeCheckpointError(f"refusing dill type {name!r}")
    return _DILL_TYPES[name]


def _numpy_globals() -> dict[tuple[str, str], Any]:
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / 1
    reconstruct = core.multiarray._reconstruct
    scalar = core.multiarray.scalar
    frombuffer = core.numeric._frombuffer
    out: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core", "numpy._core"):
        out[(f"{mod}.multiarray", "_reconstruct")] = reconstruct
        out[(f"{mod}.multiarray", "scalar")] = scalar
        out[(f"{mod}.numeric", "_frombuffer")] = frombuffer
    out[("numpy", "ndarray")] = np.ndarray
    out[("numpy", "dtype")] = np.dtype
    for dt in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "UInt8DType", "BoolDType"):
        if hasattr(np.dtypes, dt):
            out[("numpy.dtypes", dt)] = getattr(np.dtypes, dt)
    return out


def _jax_reconstruct_array(fun: Any, args: Any, arr_state: Any, aval_state: Any = None) -> np.ndarray:
    """jax ``ArrayImpl`` pickles as numpy's own reduce tuple: rebuild it as a numpy array."""
    if fun not in _numpy_globals().values():
        raise UnsafeCheckpointError(f"jax array rebuilt through a non-numpy function {fun!r}")
    arr = fun(*args)
    arr.__setstate__(arr_state)
    return arr


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Protocol-2 pickles from Python 3 store ``bytes`` as ``_codecs.encode(str, 'latin1')``."""
    if not isinstance(text, str) or encoding.lower() not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"refusing _codecs.encode with {type(text).__name__}/{encoding!r}")
    return text.encode("latin1")


BASE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
    **{("builtins", t.__name__): t for t in (set, frozenset, complex, slice, dict, list, tuple, int, float,
                                              str, bool, bytes, bytearray, object)},  # plain data types only
    ("typing", "Any"): Any,  # OmegaConf metadata refers to it
    ("dill._dill", "_create_namedtuple"): _safe_namedtuple,
    ("dill._dill", "_load_type"): _dill_load_type,
    ("jax._src.array", "_reconstruct_array"): _jax_reconstruct_array,
}

# Modules whose classes may appear as data containers in checkpoints; they become Inert.
FRAMEWORK_MODULES: tuple[str, ...] = (
    "byol", "haiku", "optax", "jax", "jaxlib", "ml_collections",
    "pytorch_lightning", "lightning", "lightning_fabric", "argparse", "omegaconf",
    "covidprognosis", "cp_examples", "pycontrast", "pathlib", "__main__",
)

# Known containers with a known structure get a real (behaviour-free) namedtuple.
BYOL_STATE = collections.namedtuple(
    "ByolExperimentState", "online_params target_params online_state target_state opt_state"
)
KNOWN_CLASSES: dict[tuple[str, str], Any] = {
    ("byol.byol_experiment", "_ByolExperimentState"): BYOL_STATE,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only allowlisted globals (see module docstring).
    ``inert_modules``: further module prefixes whose classes become inert stand-ins (e.g. the
    ``torch.nn`` modules of a whole pickled model, read for its tensors only)."""

    source: str = "<pickle>"
    extra_globals: dict[tuple[str, str], Any] = {}
    inert_modules: tuple[str, ...] = ()

    def __init__(self, file: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(file, *args, **kwargs)
        self._standins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names used by protocol <= 2 (e.g. __builtin__.set), mapped like pickle does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        for table in (self.extra_globals, _numpy_globals(), BASE_GLOBALS, KNOWN_CLASSES):
            if key in table:
                return table[key]
        if module.split(".", 1)[0] in FRAMEWORK_MODULES or any(
                module == m or module.startswith(m + ".") for m in self.inert_modules):
            if key not in self._standins:
                log.debug("%s: %s.%s replaced by an inert stand-in", self.source, module, name)
                self._standins[key] = _inert_class(module, name)
            return self._standins[key]
        raise UnsafeCheckpointError(
            f"{self.source}: refusing to load global {module}.{name} from a pickle (not an allowed "
            "data type; nothing was executed). If you trust this file, convert it to a plain "
            "state dict yourself and pass that instead."
        )


def _unpickler_for(source: str, extra: dict[tuple[str, str], Any] | None = None,
                   inert: tuple[str, ...] = ()) -> type[RestrictedUnpickler]:
    return type("BoundRestrictedUnpickler", (RestrictedUnpickler,),
                {"source": source, "extra_globals": extra or {}, "inert_modules": tuple(inert)})


def load_pickle(path: str | Path) -> Any:
    """Load a plain (non-torch) pickle, e.g. the BYOL Haiku checkpoint, through the allowlist."""
    path = Path(path)
    cls = _unpickler_for(str(path))
    try:
        with open(path, "rb") as f:
            return cls(f).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a readable pickle (truncated or corrupt?): {exc}") from exc


def torch_pickle_module(source: str, inert: tuple[str, ...] = ()) -> types.SimpleNamespace:
    """A ``pickle_module`` for ``torch.load`` that uses the restricted unpickler.

    Torch globals are limited to what ``weights_only=True`` itself accepts; classes of the
    ``inert`` module prefixes become inert stand-ins.
    """
    from torch import _weights_only_unpickler as wou

    torch_globals = {tuple(k.rsplit(".", 1)): v for k, v in wou._get_allowed_globals().items()}
    cls = _unpickler_for(source, torch_globals, inert)

    def load(file: Any, **kwargs: Any) -> Any:
        return cls(file, **kwargs).load()

    def loads(data: bytes, **kwargs: Any) -> Any:
        return cls(io.BytesIO(data), **kwargs).load()

    return types.SimpleNamespace(__name__="medxfer_restricted_pickle", Unpickler=cls, load=load, loads=loads)
