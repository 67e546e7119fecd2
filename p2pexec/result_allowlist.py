"""What results may hold without the user's word: names that only build values, and builtin data types.

Kept apart from :mod:`p2pexec.results` (how results are read) as the list
that grows with each vetted package: adding a name here is a security
decision, so each must only build a value from its arguments (no file,
no network, no code).
"""

from __future__ import annotations

import sys
from typing import Any

from .chunks import mapped_function
from .own_code import is_local_module

# module -> names that only build values (constructors of data types, reconstructors that call nothing else)
ALLOWED: dict[str, frozenset[str]] = {k: frozenset(v.split()) for k, v in {
    "p2pexec.tasks": "Outcome _rebuild_exception RemoteError _array _bytes _bytearray",
    "p2pexec.errors": "RemoteTraceback",
    "p2pexec.whereami": "WorkerInfo",  # current_worker(), returned as it is
    "p2pexec.protocol.resources": "Resources Gpu",
    "collections": "OrderedDict defaultdict deque Counter",
    "datetime": "datetime date time timedelta timezone",
    "decimal": "Decimal",
    "_io": "StringIO BytesIO",  # in-memory buffers (their state is their contents)
    "fractions": "Fraction",
    "uuid": "UUID",
    "pathlib": "Path PosixPath WindowsPath PurePath PurePosixPath PureWindowsPath",
    "ipaddress": "IPv4Address IPv6Address IPv4Network IPv6Network IPv4Interface IPv6Interface",
    "copyreg": "_reconstructor __newobj__ __newobj_ex__",
    "array": "array _array_reconstructor",
    "re": "_compile",
    "enum": "EnumMeta",
    "numpy": "ndarray dtype",
    "numpy._core.multiarray": "_reconstruct scalar",
    "numpy.core.multiarray": "_reconstruct scalar",
    "numpy._core.numeric": "_frombuffer",
    "numpy.core.numeric": "_frombuffer",
    # pandas 2 and 3 (3 names its public classes from "pandas"): data structures, dtypes, scalars, reconstructors
    "pandas": "DataFrame Series Index RangeIndex MultiIndex DatetimeIndex TimedeltaIndex PeriodIndex IntervalIndex "
              "CategoricalIndex Categorical CategoricalDtype DatetimeTZDtype IntervalDtype PeriodDtype SparseDtype "
              "StringDtype BooleanDtype Int8Dtype Int16Dtype Int32Dtype Int64Dtype UInt8Dtype UInt16Dtype UInt32Dtype "
              "UInt64Dtype Float32Dtype Float64Dtype Timestamp Timedelta Period Interval NaT NA",
    "pandas.arrays": "BooleanArray DatetimeArray IntegerArray FloatingArray PeriodArray SparseArray StringArray "
                     "TimedeltaArray IntervalArray NumpyExtensionArray Categorical",
    "pandas.core.frame": "DataFrame",
    "pandas.core.series": "Series",
    "pandas.core.indexes.base": "Index _new_Index",
    "pandas.core.indexes.range": "RangeIndex",
    "pandas.core.indexes.multi": "MultiIndex",
    "pandas.core.indexes.datetimes": "DatetimeIndex _new_DatetimeIndex",
    "pandas.core.indexes.timedeltas": "TimedeltaIndex _new_TimedeltaIndex",
    "pandas.core.indexes.period": "PeriodIndex _new_PeriodIndex",
    "pandas.core.indexes.interval": "IntervalIndex _new_IntervalIndex",
    "pandas.core.indexes.category": "CategoricalIndex",
    "pandas.core.internals.managers": "BlockManager SingleBlockManager",
    "pandas.core.arrays.categorical": "Categorical",
    "pandas.core.arrays.boolean": "BooleanArray BooleanDtype",
    "pandas.core.arrays.integer": "IntegerArray Int8Dtype Int16Dtype Int32Dtype Int64Dtype UInt8Dtype UInt16Dtype "
                                  "UInt32Dtype UInt64Dtype",
    "pandas.core.arrays.floating": "FloatingArray Float32Dtype Float64Dtype",
    "pandas.core.arrays.string_": "StringArray StringDtype",
    "pandas.core.arrays.datetimes": "DatetimeArray",
    "pandas.core.arrays.timedeltas": "TimedeltaArray",
    "pandas.core.arrays.period": "PeriodArray",
    "pandas.core.arrays.interval": "IntervalArray",
    "pandas.core.arrays.sparse.array": "SparseArray",
    "pandas.core.arrays.numpy_": "NumpyExtensionArray",
    "pandas.core.dtypes.dtypes": "CategoricalDtype DatetimeTZDtype IntervalDtype PeriodDtype SparseDtype",
    "pandas._libs.arrays": "__pyx_unpickle_NDArrayBacked",
    "pandas._libs.internals": "_unpickle_block BlockPlacement",
    "pandas._libs.sparse": "IntIndex BlockIndex",
    "pandas._libs.missing": "NA",
    "pandas._libs.interval": "Interval",
    "pandas._libs.tslibs.nattype": "_nat_unpickle",
    "pandas._libs.tslibs.timedeltas": "Timedelta _timedelta_unpickle",
    "pandas._libs.tslibs.timestamps": "Timestamp _unpickle_timestamp",
    "pandas._libs.tslibs.period": "Period",
    "pandas._libs.tslibs.offsets": "Day Hour Minute Second Milli Micro Nano Week MonthEnd MonthBegin QuarterEnd "
                                   "QuarterBegin YearEnd YearBegin BusinessDay BusinessMonthEnd BusinessMonthBegin "
                                   "BusinessHour DateOffset",
    "sklearn.tree._tree": "Tree",  # a fitted tree (forests, bagging): its constructor only sizes arrays
    "zoneinfo": "ZoneInfo",
    "zoneinfo._zoneinfo": "ZoneInfo",
}.items()}
BUILTIN_TYPES = frozenset({int, float, complex, str, bytes, bytearray, memoryview, bool, list, tuple, dict, set,
                            frozenset, slice, range, object, type(None), type(Ellipsis), type(NotImplemented)})


def task_package(fn: Any) -> str | None:
    """The installed package a task function comes from, whose classes its results may hold.

    None for the standard library, p2pexec and the user's own code (whose
    classes are allowed anyway).
    """
    fn = mapped_function(fn)
    module = getattr(fn, "__module__", None) or ""
    top = module.split(".")[0]
    # joblib is the machinery of our own backend (BatchedCalls): trust the functions it carries, not joblib.
    if not top or top in sys.stdlib_module_names or top in ("p2pexec", "dill", "joblib", "__main__") \
            or is_local_module(module):
        return None
    return top


def plain_new(cls: type) -> bool:
    """Does ``cls.__new__`` only make an object, running none of the class's code (nor an unvetted type's)?"""
    for klass in cls.__mro__:
        if klass in BUILTIN_TYPES or klass is object or issubclass(klass, BaseException) \
                or klass.__name__ in ALLOWED.get(klass.__module__, ()):
            return True  # a builtin or vetted type's __new__ (ndarray's, dict's...)
        new = vars(klass).get("__new__")
        if new is not None:
            return is_namedtuple(klass)
    return True


def is_namedtuple(cls: type) -> bool:
    """A namedtuple: its ``__new__``, which ``collections`` writes, only makes the tuple."""
    new = vars(cls).get("__new__")
    new = getattr(new, "__func__", new)
    return issubclass(cls, tuple) and getattr(new, "__globals__", {}).get("__name__", "").startswith("namedtuple_")
